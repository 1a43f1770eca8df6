//! One client connection.
//!
//! The session task reads bytes, parses every complete request, and
//! dispatches each at once (so a pipeline of requests reaches the servers as
//! a pipeline). Each request gets a [`Slot`] in a FIFO; servers' replies are
//! delivered into the slots by the backend connections (through [`Inbox`]),
//! in whatever order they arrive; the session writes out the slots at the
//! front of the FIFO as soon as they are complete, so the client always sees
//! replies in request order.
//!
//! Backpressure: the session stops reading, and stops dispatching requests
//! it has already read, while it has `--max-pipeline` requests outstanding
//! or owes the client `--max-client-buffer` bytes: replies queued to write
//! plus replies that came in for requests not yet answered. Requests
//! already sent still bring their replies; a read's reply that would take
//! what the client is owed past `--max-client-buffer` + `--max-reply-size`
//! is dropped and the read answered `SERVER_ERROR out of memory writing get
//! response` (memcached's words when it cannot buffer a get). The requests
//! themselves (a storage command's value, a long get line) count against
//! `--max-client-buffer` too until they are answered. So a client that
//! never reads holds at most that much, plus one request; and one owed
//! replies that takes none of them for `--write-timeout` is closed.
//!
//! Memory in all: what every session of a worker holds (requests in
//! flight, replies owed) is summed in the worker's `memory_held`; past its
//! share of `--max-memory`, new requests are answered `SERVER_ERROR out of
//! memory` instead of dispatched.
//!
//! Fairness: one turn of a session dispatches at most [`TURN_KEYS`] keys
//! and [`TURN_BYTES`] bytes of requests (at least one request), then lets
//! the worker's other tasks run: one client's deep pipeline of huge gets
//! slows only itself.
//!
//! Reloads: the session takes up the thread's current configuration before
//! each request it starts (and when woken), and starts none while a swap is
//! between its two phases. Each slot keeps the configuration its request
//! started under.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll};

use bytes::BytesMut;
use memrelay_protocol::auth::{self, AuthInput};
use memrelay_protocol::{parse_request, MetaStatus, Request, RequestError, ResponseKind};
use tokio::io::Interest;

use super::dispatch::{advance, start};
use super::park::Ending;
use super::reply::render;
use super::slot::{Local, Queued, Slot};
use super::{Worker, WorkerThread};
use crate::backend::{BackendError, BackendResult, Failure, Sink};
use crate::net::notify::LocalNotify;
use crate::net::outqueue::OutQueue;
use crate::net::{Stream, Woken};

/// Read buffer growth step; the buffer is allocated at the first read, not
/// at accept, so a client that never sends costs none.
const READ_CHUNK: usize = 4 * 1024;

/// While draining, a client is closed once it has sent nothing and is owed
/// nothing for this long. Closing it at once would race with a request
/// already on its way: a connection accepted just before the drain (or a
/// hand-over) has usually not sent its first request yet, and closing a
/// socket with unread input resets it. Long enough for that request to
/// arrive, short enough that idle pools are let go quickly.
const DRAIN_QUIET: std::time::Duration = std::time::Duration::from_millis(200);
/// While draining, a client that never goes quiet stops being read after
/// this long, and is closed once everything it sent is answered.
const DRAIN_BUSY: std::time::Duration = std::time::Duration::from_secs(1);

/// Stack buffer for a read into a session without a read buffer.
const FIRST_READ: usize = 1024;

/// Keys a session dispatches in one turn before it yields. Routing costs
/// time per key (a few hundred nanoseconds), and another client's request
/// waits for about three such turns (its read, the server connection's
/// write and read): a turn stays well under a millisecond. One request is
/// never split, so a get of `--max-keys` keys is a turn of its own.
const TURN_KEYS: usize = 1_000;
/// Request bytes a session dispatches in one turn before it yields.
const TURN_BYTES: usize = 128 * 1024;

/// memcached's words when it cannot allocate for a request.
const OUT_OF_MEMORY: &[u8] = b"SERVER_ERROR out of memory\r\n";

/// A write that went past a server (which missed it) whose hints fewer
/// peers took than `--peer-confirm` requires (docs/ha.md, "Confirmed
/// writes"). It may have been stored: like any `SERVER_ERROR`, its
/// outcome is unknown.
const UNCONFIRMED: &[u8] = b"SERVER_ERROR write not confirmed by the fleet\r\n";

/// Where backend connections deliver this session's replies.
#[derive(Debug)]
pub(crate) struct Inbox {
    slots: RefCell<VecDeque<Queued>>,
    /// Sequence number of `slots[0]`.
    base: Cell<u64>,
    /// Slots whose parts are all in since the session last looked.
    ready: RefCell<Vec<u64>>,
    wake: LocalNotify,
    /// The session read something since the worker's last idle sweep.
    active: Cell<bool>,
    /// The session holds buffers it could give back when idle, or a
    /// socket it could park (`proxy::park`).
    holds_buffers: Cell<bool>,
    /// Set by the idle sweep: give the buffers back if still idle.
    release: Cell<bool>,
    /// Bytes of server replies held in `slots`, not yet rendered.
    held: Cell<usize>,
    /// Bytes queued to the client, as of the session's last turn (replies
    /// are delivered only while the session waits, so this is current).
    unsent: Cell<usize>,
    /// Bytes of the requests held in `slots` (their frames: a storage
    /// command's value, a get's line), until answered.
    requests: Cell<usize>,
    /// What this session last added to its worker's `memory_held`.
    published: Cell<usize>,
    /// Most reply bytes one read may hold (`--max-reply-size`).
    max_reply: usize,
    /// Most reply bytes the client may be owed in all before a read's reply
    /// is dropped: its buffer plus one largest reply.
    max_owed: usize,
    /// Its next reply waits for the fleet to answer its hints, and it is
    /// in `HINT_WAITERS`.
    awaits_hints: Cell<bool>,
}

thread_local! {
    /// The sessions of this worker thread whose next reply waits for the
    /// fleet's answer to their hints (`Session::await_hints`), woken by
    /// the thread's one `wake_hint_waiters` task.
    static HINT_WAITERS: RefCell<Vec<Weak<Inbox>>> = const { RefCell::new(Vec::new()) };
    /// Whether that task runs (started at the thread's first wait).
    static HINT_WAKER: Cell<bool> = const { Cell::new(false) };
}

/// Wakes the sessions waiting for the fleet each time a batch of this
/// thread's hints is answered (each looks again: one whose hints are in a
/// later batch waits again).
async fn wake_hint_waiters(answers: crate::fleet::HintAnswers) {
    loop {
        answers.next().await;
        for waiter in HINT_WAITERS.with(|w| std::mem::take(&mut *w.borrow_mut())) {
            if let Some(inbox) = waiter.upgrade() {
                inbox.awaits_hints.set(false);
                inbox.wake.notify();
            }
        }
    }
}

impl Inbox {
    pub(crate) fn new(limits: &super::ClientLimits) -> Inbox {
        Inbox {
            slots: RefCell::default(),
            base: Cell::default(),
            ready: RefCell::default(),
            wake: LocalNotify::default(),
            active: Cell::new(false),
            holds_buffers: Cell::new(false),
            release: Cell::new(false),
            held: Cell::new(0),
            unsent: Cell::new(0),
            requests: Cell::new(0),
            published: Cell::new(0),
            max_reply: limits.max_reply,
            max_owed: limits.max_buffer.saturating_add(limits.max_reply),
            awaits_hints: Cell::new(false),
        }
    }

    /// Wakes the session (to notice that the worker is draining).
    pub(crate) fn wake(&self) {
        self.wake.notify();
    }

    /// The worker's idle sweep: a session that holds buffers and read
    /// nothing since the last sweep is asked to give them back. Costs the
    /// request path one flag store per read.
    pub(crate) fn sweep_idle(&self) -> bool {
        if !self.active.replace(false) && self.holds_buffers.get() {
            self.release.set(true);
            self.wake.notify();
            return true;
        }
        false
    }

    /// Whether a read's reply of `n` bytes may not be held: the read's
    /// replies together would pass the reply cap (a multi-get over several
    /// servers, or many backup lookups), or the client would be owed more
    /// than it may. Only reads are refused: their replies are the large
    /// ones, and a write's answer is never dropped, since the HA layer acts
    /// on it.
    fn refuse(&self, slot: &Slot, reply: &BackendResult, n: usize) -> Option<Failure> {
        let carries_values = matches!(reply, Ok(r) if matches!(r.kind,
            ResponseKind::Values { .. } | ResponseKind::Meta(MetaStatus::Value)));
        if !carries_values || !slot.is_read() {
            None
        } else if slot.held + n > self.max_reply {
            Some(Failure::ReplyTooLarge)
        } else if self.held.get() + self.unsent.get() + n > self.max_owed {
            Some(Failure::ClientBehind)
        } else {
            None
        }
    }
}

impl Sink for Inbox {
    fn deliver(&self, token: u64, part: u32, result: BackendResult) {
        let mut slots = self.slots.borrow_mut();
        let Some(slot) = token
            .checked_sub(self.base.get())
            .and_then(|i| slots.get_mut(i as usize))
        else {
            return; // the session is gone; nobody waits for this reply
        };
        if !slot.awaits(part) {
            return;
        }
        let n = result.as_ref().map_or(0, |r| r.bytes.len());
        let result = match self.refuse(slot, &result, n) {
            Some(failure) => Err(BackendError {
                failure,
                sent: true,
            }),
            None => {
                slot.held += n;
                self.held.set(self.held.get() + n);
                result
            }
        };
        if slot.fill(part, result) {
            self.ready.borrow_mut().push(token);
            self.wake.notify();
        }
    }
}

/// Serves one client until it leaves, errs, or is told to close, or until
/// it has been idle long enough to be parked (`proxy::park`), then
/// calls `done` with how it ended. `authenticated`: the client already
/// authenticated (a parked session's successor).
///
/// The future is the session task's, held for as long as the client stays
/// connected, mostly idle: what it holds across its wait is paid per
/// connection (see docs/performance.md). So it is an async block, which
/// keeps one copy of what it captures, where an async fn keeps its
/// arguments twice (as arguments and as the locals they are moved into);
/// the buffers are out of line and only while there is work
/// ([`Buffers`]); and the wait holds a few words ([`Stream::ready_or`]).
pub(crate) fn serve<S: Stream>(
    stream: S,
    thread: Rc<WorkerThread>,
    authenticated: bool,
    done: impl FnOnce(&Rc<WorkerThread>, Ending),
) -> impl Future<Output = ()> {
    let worker = thread.current();
    let inbox = Rc::new(Inbox::new(&worker.client_limits));
    thread.register(&inbox);
    let open = worker.auth.is_none() || authenticated;
    // A client that connects and sends nothing is parked too.
    inbox.holds_buffers.set(stream.parkable());
    let mut s = Session {
        worker,
        thread,
        inbox,
        bufs: None,
        next_seq: 0,
        eof: false,
        closing: false,
        close_after_flush: false,
        idle_timer: None,
        authenticated: open,
        fenced: false,
        park: false,
    };
    async move {
        while let Some(Wait {
            interest,
            can_read,
            idle,
        }) = s.turn(&stream)
        {
            if s.turn_spent() {
                // Requests are waiting in the read buffer, but this turn's
                // share is used: the worker's other tasks go first.
                tokio::task::yield_now().await;
                continue;
            }
            let woken = stream.ready_or(interest, |cx| s.poll_wake(cx, idle)).await;
            if !s.woken(&stream, woken, can_read) {
                break;
            }
        }
        if s.park {
            // Idle, nothing outstanding, buffers given back: the socket
            // waits in the worker's parking lot, without this task.
            s.inbox.base.set(u64::MAX);
            s.publish_memory(0);
            let (thread, authenticated) = (s.thread.clone(), s.authenticated);
            drop(s);
            let ending = match stream.into_parked() {
                Ok(socket) => Ending::Parked {
                    socket,
                    authenticated,
                },
                Err(_) => Ending::Closed,
            };
            return done(&thread, ending);
        }
        // The client is gone. Requests already sent finish all their legs
        // (a write's copies to the backups and their checks), so that a
        // client closing its connection cannot take the backups' copies
        // with it; what is still unfinished at the deadline has an unknown
        // outcome, and only that is recorded as missed. Boxed: the idle
        // session's future must not carry this wait.
        Box::pin(s.finish_legs()).await;
        s.abandon_writes();
        // No reply will hand over the hints its requests made: they go now.
        crate::fleet::flush_hints();
        // Replies still in flight will find no slot and be dropped.
        s.inbox.slots.borrow_mut().clear();
        s.inbox.requests.set(0);
        s.inbox.held.set(0);
        s.publish_memory(0);
        s.inbox.base.set(u64::MAX);
        let thread = s.thread.clone();
        drop(s);
        stream.finish().await;
        done(&thread, Ending::Closed);
    }
}

/// What a session holds only while it has work: made at its first data
/// (or reply), given back once it is idle (see `release_if_idle`), so that
/// an idle session's task carries one pointer instead of these.
#[derive(Default)]
struct Buffers {
    rbuf: BytesMut,
    out: OutQueue,
    /// Reused list of slots to advance (swapped with the inbox's).
    ready: Vec<u64>,
    /// Input bytes still to discard (the data of a value that was too large).
    swallow: usize,
    /// The keys of unfinished requests (see `proxy::fence`).
    fences: super::fence::Fences,
    /// Keys and request bytes dispatched in this turn (see [`TURN_KEYS`]).
    turn_keys: usize,
    turn_bytes: usize,
    /// Since when replies wait for a socket that takes none of them.
    stalled_since: Option<tokio::time::Instant>,
}

struct Session {
    thread: Rc<WorkerThread>,
    /// The configuration of the requests this session starts.
    worker: Rc<Worker>,
    inbox: Rc<Inbox>,
    bufs: Option<Box<Buffers>>,
    next_seq: u64,
    /// The client sent EOF: read nothing more, but finish what was sent.
    eof: bool,
    /// `quit` or a fatal input: parse nothing more.
    closing: bool,
    /// Close once everything before the closing reply is written.
    close_after_flush: bool,
    /// The idle/drain timer (see `turn`), boxed and made on first use.
    idle_timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// The client may send requests: it authenticated, or `--auth-file`
    /// is not set. Until then everything it sends is read as memcached
    /// reads it with `-Y` (see `authenticate`).
    authenticated: bool,
    /// The next request waits for an earlier one on its key to finish
    /// (see `proxy::fence`): nothing more is dispatched or read until then.
    fenced: bool,
    /// Idle with nothing held: the session ends, its socket parked.
    park: bool,
}

/// What a session waits for between two turns.
struct Wait {
    /// What of the socket: reading, writing, both or neither.
    interest: Option<Interest>,
    /// The session reads when the socket is readable.
    can_read: bool,
    /// The idle timer is armed.
    idle: bool,
}

/// What woke a waiting session other than its socket.
enum Wake {
    /// Its inbox: replies came in, a reload, a drain, an idle sweep.
    Inbox,
    /// Its idle timer: it is closed.
    Idle,
}

impl Session {
    /// Everything the session can do without waiting: take up a reload,
    /// advance and answer the requests whose replies came in, dispatch
    /// what was read, write what the socket takes. Returns what to wait
    /// for next, or None when the session is over.
    fn turn<S: Stream>(&mut self, stream: &S) -> Option<Wait> {
        self.take_up_reload();
        let draining = self.thread.draining.get();
        if self.inbox.release.take() {
            self.release_if_idle();
            if self.may_park(stream, draining.is_some()) {
                self.park = true;
                return None;
            }
        }
        if draining.is_some_and(|t| t.elapsed() >= DRAIN_BUSY) {
            // Shutting down, and this client keeps sending: finish what
            // was sent, read nothing more.
            self.eof = true;
        }
        self.advance_ready();
        self.emit_ready();
        // Requests already buffered while the pipeline was full.
        let buffered = self.bufs.as_ref().is_some_and(|b| !b.rbuf.is_empty());
        if !self.closing && buffered && self.may_dispatch() {
            self.process();
            self.emit_ready();
        }
        if let Some(b) = self.bufs.as_deref_mut().filter(|b| !b.out.is_empty()) {
            // The fleet's hints kept so far go to the peers (the replies
            // that depend on them wait in `emit_ready` for their answer).
            crate::fleet::flush_hints();
            let wrote = match b.out.write_to(|iov| stream.try_write_vectored(iov)) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(_) => return None,
            };
            self.worker.stats.bytes_written.add(wrote as u64);
            b.stalled_since = match b.stalled_since {
                _ if b.out.is_empty() => None,
                Some(t) if wrote == 0 => Some(t),
                _ => Some(tokio::time::Instant::now()),
            };
        }
        let unsent = self.unsent();
        let outstanding = self.inbox.slots.borrow().len();
        let finished = self.closing || self.eof;
        if unsent == 0 && (self.close_after_flush || (finished && outstanding == 0)) {
            return None;
        }
        let can_read = !finished && !self.thread.is_paused() && self.may_dispatch();
        // Replies are delivered only while the session waits.
        self.inbox.unsent.set(unsent);
        self.publish_memory(unsent + self.inbox.held.get() + self.inbox.requests.get());
        let interest = match (can_read, unsent > 0) {
            (true, true) => Some(Interest::READABLE | Interest::WRITABLE),
            (true, false) => Some(Interest::READABLE),
            (false, true) => Some(Interest::WRITABLE),
            (false, false) => None,
        };
        let deadline = self.deadline(stream, draining.is_some(), outstanding, unsent);
        if let Some(deadline) = deadline {
            // One timer per session, made the first time it is needed and
            // re-armed after: it is not in the session's future, so an idle
            // connection without a deadline does not carry it.
            let timer = self
                .idle_timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            timer.as_mut().reset(deadline);
        }
        Some(Wait {
            interest,
            can_read,
            idle: deadline.is_some(),
        })
    }

    /// When the session is closed if nothing happens before:
    /// - owed replies that the socket takes none of: `--write-timeout`
    ///   after it last took some;
    /// - nothing outstanding: `--idle-timeout` (memcached's idle_timeout;
    ///   off by default, as in memcached), `DRAIN_QUIET` while draining,
    ///   and `--handshake-timeout` before the client authenticated (with
    ///   `--auth-file`) or finished its TLS handshake.
    fn deadline<S: Stream>(
        &self,
        stream: &S,
        draining: bool,
        outstanding: usize,
        unsent: usize,
    ) -> Option<tokio::time::Instant> {
        let limits = &self.worker.client_limits;
        let now = tokio::time::Instant::now();
        if unsent > 0 {
            let since = self.bufs.as_ref().and_then(|b| b.stalled_since);
            return Some(since.unwrap_or(now) + limits.write_timeout);
        }
        if outstanding > 0 {
            return None;
        }
        let idle = if draining {
            Some(DRAIN_QUIET)
        } else {
            limits.idle_timeout
        };
        let setting_up = !self.authenticated || stream.handshaking();
        let idle = match (idle, setting_up) {
            (Some(d), true) => Some(d.min(limits.handshake_timeout)),
            (None, true) => Some(limits.handshake_timeout),
            (d, false) => d,
        };
        idle.map(|d| now + d)
    }

    /// Whether this session, just asked by the idle sweep to give its
    /// buffers back, may end with its socket parked: it gave them back
    /// (nothing read, owed or in flight), it is past setting up, and no
    /// timer of its own must run (`--idle-timeout`, a drain).
    fn may_park<S: Stream>(&self, stream: &S, draining: bool) -> bool {
        self.bufs.is_none()
            && stream.parkable()
            && self.authenticated
            && !stream.handshaking()
            && !draining
            && !self.eof
            && !self.closing
            && !self.fenced
            && self.worker.client_limits.idle_timeout.is_none()
            && self.inbox.slots.borrow().is_empty()
            && self.inbox.ready.borrow().is_empty()
    }

    /// Sets what this session holds in its worker's `memory_held`.
    fn publish_memory(&self, bytes: usize) {
        let before = self.inbox.published.replace(bytes);
        let held = &self.worker.stats.memory_held;
        if bytes >= before {
            held.add((bytes - before) as u64);
        } else {
            held.sub((before - bytes) as u64);
        }
    }

    /// Whether this turn's share of work is used with requests still
    /// buffered; if so, the next turn starts with a fresh share.
    fn turn_spent(&mut self) -> bool {
        let Some(b) = self.bufs.as_deref_mut() else {
            return false;
        };
        let spent = b.turn_keys >= TURN_KEYS || b.turn_bytes >= TURN_BYTES;
        b.turn_keys = 0;
        b.turn_bytes = 0;
        spent && !b.rbuf.is_empty() && !self.closing
    }

    /// The sources of a waiting session's wake-ups other than its socket,
    /// in order: its inbox, then (if armed) its idle timer.
    fn poll_wake(&mut self, cx: &mut Context<'_>, idle: bool) -> Poll<Wake> {
        if self.inbox.wake.poll_notified(cx).is_ready() {
            return Poll::Ready(Wake::Inbox);
        }
        if let Some(timer) = self.idle_timer.as_mut().filter(|_| idle) {
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Idle);
            }
        }
        Poll::Pending
    }

    /// Acts on what ended a wait. Returns false when the session is over.
    fn woken<S: Stream>(&mut self, stream: &S, woken: Woken<Wake>, can_read: bool) -> bool {
        match woken {
            Woken::Other(Wake::Inbox) => true,
            Woken::Other(Wake::Idle) => false,
            Woken::Stream(Ok(r)) => {
                if r.is_readable() && can_read && !self.read(stream) {
                    self.eof = true;
                }
                true
            }
            Woken::Stream(Err(_)) => false,
        }
    }

    /// Reply bytes queued to the client.
    fn unsent(&self) -> usize {
        self.bufs.as_ref().map_or(0, |b| b.out.len())
    }

    /// The client is gone and `finish_legs` gave up on these writes (still
    /// on the primary or being copied past its deadline): their copies
    /// will not be made or checked, so the backups may keep an older item
    /// than the primary's. Record them as having missed the key (the
    /// prober deletes it there; the primary holds the truth). A write
    /// already failed over to a backup is left alone: that backup may hold
    /// the key's only copy.
    fn abandon_writes(&self) {
        for slot in self.inbox.slots.borrow().iter() {
            let (Some(req), Some(replicas)) = (&slot.req, slot.replicas) else {
                continue;
            };
            if !slot.copies_unsettled() {
                continue;
            }
            // Server indexes mean what they meant under the slot's own
            // configuration.
            let w = slot.worker.as_deref().unwrap_or(&self.worker);
            let key = crate::ha::route_key(&slot.frame, req);
            for tier in 1..replicas.len() {
                if let Some(server) = replicas.get(tier) {
                    w.servers[server].health().missed.record(&key);
                }
            }
        }
    }

    /// The client left: advances its requests in flight until each is
    /// finished (their replies go nowhere), for at most a few server
    /// timeouts (a write that fails over walks the tiers, each bounded).
    async fn finish_legs(&mut self) {
        let b = self.worker.backend;
        let deadline = tokio::time::Instant::now() + (b.connect_timeout + b.timeout) * 4;
        loop {
            self.advance_ready();
            if self.inbox.slots.borrow().iter().all(|q| q.is_done()) {
                return;
            }
            let wake = std::future::poll_fn(|cx| self.inbox.wake.poll_notified(cx));
            if tokio::time::timeout_at(deadline, wake).await.is_err() {
                return;
            }
        }
    }

    /// Gives the buffers back to the allocator if nothing is buffered or
    /// owed: an idle connection then costs its task and socket, not the
    /// read buffer and reply queue its busiest moment grew (memcached
    /// shrinks idle connections' buffers the same way).
    fn release_if_idle(&mut self) {
        if let Some(b) = &self.bufs {
            if !b.rbuf.is_empty() || b.swallow > 0 || !b.out.is_empty() {
                return;
            }
        }
        let mut slots = self.inbox.slots.borrow_mut();
        if !slots.is_empty() {
            return;
        }
        *slots = VecDeque::new();
        *self.inbox.ready.borrow_mut() = Vec::new();
        self.bufs = None;
        self.inbox.holds_buffers.set(false);
    }

    /// Reads what is available and handles every complete request. Returns
    /// false at end of input.
    fn read<S: Stream>(&mut self, stream: &S) -> bool {
        loop {
            let r = match self.bufs.as_deref_mut().filter(|b| b.rbuf.capacity() > 0) {
                Some(b) => {
                    if b.rbuf.capacity() - b.rbuf.len() < READ_CHUNK / 4 {
                        b.rbuf.reserve(READ_CHUNK);
                    }
                    stream.read_drained(&mut b.rbuf)
                }
                None => {
                    // No buffer (a new session, or one that gave it back
                    // when idle), and a readiness event is not always
                    // data: read into the stack first, so a client that
                    // sends nothing costs no buffer.
                    let mut first = [0u8; FIRST_READ];
                    match stream.try_read(&mut first) {
                        Ok(n) if n > 0 => {
                            let rbuf = &mut self.bufs.get_or_insert_with(Box::default).rbuf;
                            rbuf.reserve(READ_CHUNK.max(n));
                            rbuf.extend_from_slice(&first[..n]);
                            Ok(n)
                        }
                        other => other,
                    }
                }
            };
            match r {
                Ok(0) => {
                    self.process();
                    return false;
                }
                Ok(n) => {
                    self.worker.stats.bytes_read.add(n as u64);
                    self.inbox.active.set(true);
                    self.inbox.holds_buffers.set(true);
                    self.process();
                    if self.closing || !self.may_dispatch() || self.over_turn() {
                        return true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
    }

    /// Whether another request may be dispatched: fewer than
    /// `--max-pipeline` outstanding, and the client holding less than
    /// `--max-client-buffer` (replies queued, replies held in slots, and
    /// the requests not yet answered).
    fn may_dispatch(&self) -> bool {
        let limits = &self.worker.client_limits;
        !self.fenced
            && self.inbox.slots.borrow().len() < limits.max_pipeline
            && self.unsent() + self.inbox.held.get() + self.inbox.requests.get() < limits.max_buffer
    }

    /// Whether this turn dispatched its share (see [`TURN_KEYS`]).
    fn over_turn(&self) -> bool {
        self.bufs
            .as_ref()
            .is_some_and(|b| b.turn_keys >= TURN_KEYS || b.turn_bytes >= TURN_BYTES)
    }

    /// Whether this worker's clients hold more than its share of
    /// `--max-memory`: new requests are then shed.
    fn over_memory(&self) -> bool {
        self.worker.stats.memory_held.get() as usize > self.worker.client_limits.max_memory
    }

    /// Uses the thread's current configuration for the requests to come.
    #[inline]
    fn take_up_reload(&mut self) {
        if !self.thread.is_current(&self.worker) {
            self.worker = self.thread.current();
        }
    }

    /// Parses and dispatches every complete request in the read buffer.
    fn process(&mut self) {
        while !self.closing {
            if self.thread.is_paused() {
                // A swap is under way: the rest waits for it (the install
                // wakes this session).
                return;
            }
            self.take_up_reload();
            let may_dispatch = self.may_dispatch();
            let over_memory = self.over_memory();
            let Some(b) = self.bufs.as_deref_mut() else {
                return;
            };
            if b.swallow > 0 {
                let n = b.swallow.min(b.rbuf.len());
                let _ = b.rbuf.split_to(n);
                b.swallow -= n;
                if b.swallow > 0 {
                    return;
                }
            }
            if b.rbuf.is_empty()
                || !may_dispatch
                || b.turn_keys >= TURN_KEYS
                || b.turn_bytes >= TURN_BYTES
            {
                return;
            }
            if !self.authenticated {
                if !self.authenticate() {
                    return;
                }
                continue;
            }
            match parse_request(&b.rbuf, &self.worker.limits) {
                Ok(None) => return,
                Ok(Some((req, n))) => {
                    if b.fences.blocks(&b.rbuf[..n], &req) {
                        // It stays in the buffer, parsed again once the
                        // earlier request on its key is finished.
                        self.fenced = true;
                        return;
                    }
                    self.dispatch(req, n, over_memory);
                }
                Err(e) => self.refuse_input(e),
            }
        }
    }

    /// Dispatches the request that is the read buffer's first `n` bytes:
    /// its slot joins the FIFO (answered at once when the worker is over
    /// its share of `--max-memory`).
    fn dispatch(&mut self, req: Request, n: usize, over_memory: bool) {
        let Some(b) = self.bufs.as_deref_mut() else {
            return;
        };
        let frame = b.rbuf.split_to(n).freeze();
        b.turn_keys += req.nkeys.max(1) as usize;
        b.turn_bytes += n;
        let seq = self.next_seq;
        self.next_seq += 1;
        // Only what reaches the servers is shed: `stats` and the like
        // still answer, to show why.
        if req.key.len > 0 && over_memory {
            self.worker.stats.memory_shed.incr();
            let slot = Queued::local(Local::Static(OUT_OF_MEMORY));
            self.inbox.slots.borrow_mut().push_back(slot);
            return;
        }
        self.inbox.requests.set(self.inbox.requests.get() + n);
        let hints = crate::fleet::hints_made();
        let mut slot = Queued::new(
            start(&self.worker, &self.inbox, seq, frame, req),
            self.worker.clone(),
        );
        // Sub-requests that failed at once (servers down) leave the slot
        // ready for its next step right away.
        advance(&self.worker, &self.inbox, seq, &mut slot);
        slot.stepped(hints);
        b.fences
            .dispatched(&mut slot, self.worker.router.has_backups());
        self.inbox.slots.borrow_mut().push_back(slot);
        if req.command == memrelay_protocol::Command::Quit {
            self.closing = true;
        }
    }

    /// Input that is no valid request: memcached's error reply, in order
    /// (none with `noreply`), and the connection closed when memcached
    /// would close it.
    fn refuse_input(&mut self, e: RequestError) {
        let Some(b) = self.bufs.as_deref_mut() else {
            return;
        };
        let frame = b.rbuf.split_to(e.consumed.min(b.rbuf.len())).freeze();
        b.swallow = e.swallow;
        self.worker.stats.client_errors.incr();
        if let Some(key) = e.unlink_key {
            super::dispatch::unlink(&self.worker, &frame, key.of(&frame));
        }
        let local = if e.kind.closes() {
            self.closing = true;
            Local::Close(e.kind.reply())
        } else if e.noreply {
            return;
        } else {
            Local::Static(e.kind.reply())
        };
        self.next_seq += 1;
        self.inbox
            .slots
            .borrow_mut()
            .push_back(Queued::local(local));
    }

    /// Handles one input of a client that has not authenticated: an attempt
    /// (answered `STORED` or `CLIENT_ERROR authentication failure`), or
    /// anything else (memcached's error line). Nothing reaches a server.
    /// Returns false when the input is incomplete.
    fn authenticate(&mut self) -> bool {
        let Some(creds) = self.worker.auth.clone() else {
            self.authenticated = true;
            return true;
        };
        let Some(b) = self.bufs.as_deref_mut() else {
            return false;
        };
        let stats = &self.worker.stats;
        let (local, n) = match auth::parse_auth(&b.rbuf) {
            Ok(None) => return false,
            Ok(Some((AuthInput::Credentials { user, password }, n))) => {
                stats.auth_cmds.incr();
                if creds.check(user, password) {
                    self.authenticated = true;
                    (Local::Static(auth::AUTH_OK), n)
                } else {
                    stats.auth_errors.incr();
                    tracing::debug!("client authentication failed");
                    (Local::Static(auth::AUTH_FAILED), n)
                }
            }
            Ok(Some((input, n))) => (Local::Static(input.reply()), n),
            Err(e) => {
                if e == auth::AuthError::DataTooLong {
                    stats.auth_cmds.incr();
                    stats.auth_errors.incr();
                }
                self.closing = true;
                (Local::Close(e.reply()), b.rbuf.len())
            }
        };
        let _ = b.rbuf.split_to(n);
        self.next_seq += 1;
        self.inbox
            .slots
            .borrow_mut()
            .push_back(Queued::local(local));
        true
    }

    /// Takes the next step for every slot whose parts all came in.
    fn advance_ready(&mut self) {
        if self.inbox.ready.borrow().is_empty() {
            return;
        }
        let b = self.bufs.get_or_insert_with(Box::default);
        loop {
            std::mem::swap(&mut b.ready, &mut *self.inbox.ready.borrow_mut());
            if b.ready.is_empty() {
                return;
            }
            for &seq in &b.ready {
                let mut slots = self.inbox.slots.borrow_mut();
                let Some(slot) = seq
                    .checked_sub(self.inbox.base.get())
                    .and_then(|i| slots.get_mut(i as usize))
                else {
                    continue;
                };
                let w = slot.worker.clone().unwrap_or_else(|| self.worker.clone());
                let hints = crate::fleet::hints_made();
                advance(&w, &self.inbox, seq, slot);
                slot.stepped(hints);
                if b.fences.finished(slot) {
                    self.fenced = false;
                }
            }
            b.ready.clear();
        }
    }

    /// The reply at the front waits for the fleet to answer its hints:
    /// they are handed over, and the session is woken once a batch is
    /// answered. The worker's other sessions go on meanwhile.
    fn await_hints(&self) {
        crate::fleet::flush_hints();
        if self.inbox.awaits_hints.replace(true) {
            return;
        }
        HINT_WAITERS.with(|w| w.borrow_mut().push(Rc::downgrade(&self.inbox)));
        if !HINT_WAKER.get() {
            if let Some(answers) = crate::fleet::HintAnswers::of_this_thread() {
                HINT_WAKER.set(true);
                tokio::task::spawn_local(wake_hint_waiters(answers));
            }
        }
    }

    /// Writes out every complete reply at the front of the FIFO.
    fn emit_ready(&mut self) {
        loop {
            let slot = {
                let mut slots = self.inbox.slots.borrow_mut();
                match slots.front() {
                    // Its request went past a server: the reply leaves
                    // once the fleet has what it depends on.
                    Some(s)
                        if s.is_done()
                            && s.hints.1 > 0
                            && s.hints.1 > crate::fleet::hints_answered() =>
                    {
                        drop(slots);
                        self.await_hints();
                        return;
                    }
                    Some(s) if s.is_done() => {}
                    _ => return,
                }
                self.inbox.base.set(self.inbox.base.get() + 1);
                slots.pop_front()
            };
            let Some(mut slot) = slot else { return };
            self.inbox.held.set(self.inbox.held.get() - slot.held);
            let requests = self.inbox.requests.get();
            self.inbox
                .requests
                .set(requests.saturating_sub(slot.frame.len()));
            let w = slot.worker.take().unwrap_or_else(|| self.worker.clone());
            if !slot.fleet_confirmed() {
                // What the write went past may be known here only: the
                // client must not take it as acknowledged.
                let quiet = slot.req.is_some_and(|r| r.noreply);
                slot.local = Some(Local::Static(if quiet { b"" } else { UNCONFIRMED }));
            }
            let out = &mut self.bufs.get_or_insert_with(Box::default).out;
            if render(&w, slot.slot, out) {
                self.close_after_flush = true;
                self.closing = true;
                self.inbox.slots.borrow_mut().clear();
                self.inbox.held.set(0);
                self.inbox.requests.set(0);
                return;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::backend::BackendSettings;
    use crate::config::cli::{parse_args, Action};
    use crate::ha::replica::Replica;
    use crate::proxy::ThreadContext;
    use crate::router::Router;
    use crate::stats::StatsRegistry;
    use crate::topology::Topology;

    /// An idle connection's memory is mostly its task (docs/performance.md).
    /// tokio allocates a task as one block, aligned and sized in steps of
    /// 128 bytes, with 104 bytes of its own besides the future: a session
    /// future of at most 152 bytes keeps a plain socket's task at 256. One
    /// more field in `Session`, or one more value held across its wait,
    /// can take it to 384. (A test build lays the future out a little
    /// larger than a release build: 144 bytes against 136 when written.)
    #[test]
    fn an_idle_session_task_takes_256_bytes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            let Action::Run(cfg) = parse_args(["-s", "127.0.0.1:11211"]).unwrap() else {
                panic!("not a run");
            };
            let cfg = Arc::new(*cfg);
            let topo = Topology {
                generation: 1,
                config: cfg.clone(),
                router: Router::new(&cfg),
                health: cfg
                    .servers()
                    .map(|s| Arc::new(Replica::new(s.name.clone(), 16, 1)))
                    .collect(),
                transition: None,
            };
            let registry = Arc::new(StatsRegistry::new(1, 16, Vec::new()));
            let (resync, _requests) = tokio::sync::mpsc::unbounded_channel();
            let ctx = ThreadContext {
                stats: registry.workers[0].clone(),
                registry,
                resync,
                reload: None,
                events: None,
                backend: Rc::new(Cell::new(BackendSettings::of(&cfg))),
            };
            let thread = Rc::new(WorkerThread::new(ctx, &topo));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let client = tokio::net::TcpStream::connect(addr).await.unwrap();
            // As the accept loop spawns it.
            let conns = Arc::new(AtomicUsize::new(1));
            let session = serve(client, thread, false, move |_, _| {
                conns.fetch_sub(1, Ordering::AcqRel);
            });
            let size = std::mem::size_of_val(&session);
            assert!(size <= 152, "the session future takes {size} bytes");
        });
    }
}
