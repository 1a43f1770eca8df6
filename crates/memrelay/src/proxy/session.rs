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
//! Backpressure: the session stops reading while it has `--max-pipeline`
//! requests outstanding or `--max-client-buffer` bytes unsent.
//!
//! Reloads: the session takes up the thread's current configuration before
//! each request it starts (and when woken), and starts none while a swap is
//! between its two phases. Each slot keeps the configuration its request
//! started under.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::rc::Rc;

use bytes::BytesMut;
use memrelay_protocol::parse_request;
use tokio::io::Interest;

use super::dispatch::{advance, start};
use super::reply::render;
use super::slot::{Local, Slot, Stage};
use super::{Worker, WorkerThread};
use crate::backend::{BackendResult, Sink};
use crate::net::notify::LocalNotify;
use crate::net::outqueue::OutQueue;
use crate::net::Stream;

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

/// Where backend connections deliver this session's replies.
#[derive(Debug, Default)]
pub struct Inbox {
    slots: RefCell<VecDeque<Slot>>,
    /// Sequence number of `slots[0]`.
    base: Cell<u64>,
    /// Slots whose parts are all in since the session last looked.
    ready: RefCell<Vec<u64>>,
    wake: LocalNotify,
}

impl Inbox {
    /// Wakes the session (to notice that the worker is draining).
    pub fn wake(&self) {
        self.wake.notify();
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
        let Some(p) = slot.parts.get_mut(part as usize) else {
            return;
        };
        if p.result.is_some() {
            return;
        }
        p.result = Some(result);
        slot.pending -= 1;
        if slot.pending == 0 {
            self.ready.borrow_mut().push(token);
            self.wake.notify();
        }
    }
}

/// Serves one client until it leaves, errs, or is told to close.
pub async fn serve<S: Stream>(stream: S, thread: Rc<WorkerThread>) {
    let inbox = Rc::new(Inbox::default());
    thread.register(&inbox);
    let mut s = Session {
        worker: thread.current(),
        thread,
        inbox,
        rbuf: BytesMut::new(),
        out: OutQueue::new(),
        next_seq: 0,
        ready: Vec::new(),
        swallow: 0,
        eof: false,
        closing: false,
        close_after_flush: false,
    };
    s.run(&stream).await;
    // Replies still in flight will find no slot and be dropped.
    s.inbox.slots.borrow_mut().clear();
    s.inbox.base.set(u64::MAX);
}

struct Session {
    thread: Rc<WorkerThread>,
    /// The configuration of the requests this session starts.
    worker: Rc<Worker>,
    inbox: Rc<Inbox>,
    rbuf: BytesMut,
    out: OutQueue,
    next_seq: u64,
    /// Reused list of slots to advance (swapped with the inbox's).
    ready: Vec<u64>,
    /// Input bytes still to discard (the data of a value that was too large).
    swallow: usize,
    /// The client sent EOF: read nothing more, but finish what was sent.
    eof: bool,
    /// `quit` or a fatal input: parse nothing more.
    closing: bool,
    /// Close once everything before the closing reply is written.
    close_after_flush: bool,
}

impl Session {
    async fn run<S: Stream>(&mut self, stream: &S) {
        loop {
            self.take_up_reload();
            let draining = self.thread.draining.get();
            if draining.is_some_and(|t| t.elapsed() >= DRAIN_BUSY) {
                // Shutting down, and this client keeps sending: finish what
                // was sent, read nothing more.
                self.eof = true;
            }
            self.advance_ready();
            self.emit_ready();
            // Requests already buffered while the pipeline was full.
            if !self.closing
                && !self.rbuf.is_empty()
                && self.inbox.slots.borrow().len() < self.worker.client_limits.max_pipeline
            {
                self.process();
                self.emit_ready();
            }
            if !self.out.is_empty() {
                match self.out.write_to(|iov| stream.try_write_vectored(iov)) {
                    Ok(n) => self.worker.stats.bytes_written.add(n as u64),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
            let outstanding = self.inbox.slots.borrow().len();
            let finished = self.closing || self.eof;
            if self.out.is_empty() && (self.close_after_flush || (finished && outstanding == 0)) {
                return;
            }
            let can_read = !finished
                && !self.thread.is_paused()
                && outstanding < self.worker.client_limits.max_pipeline
                && self.out.len() < self.worker.client_limits.max_buffer;
            let interest = match (can_read, !self.out.is_empty()) {
                (true, true) => Some(Interest::READABLE | Interest::WRITABLE),
                (true, false) => Some(Interest::READABLE),
                (false, true) => Some(Interest::WRITABLE),
                (false, false) => None,
            };
            let inbox = self.inbox.clone();
            // With --idle-timeout, a client with nothing outstanding that
            // sends nothing for that long is closed (memcached's
            // idle_timeout; off by default, as in memcached). Draining
            // shortens it to DRAIN_QUIET.
            let idle = match draining {
                Some(_) => Some(DRAIN_QUIET),
                None => self.worker.client_limits.idle_timeout,
            }
            .filter(|_| outstanding == 0 && self.out.is_empty());
            tokio::select! {
                biased;
                _ = inbox.wake.notified() => {}
                _ = async { match idle { Some(d) => tokio::time::sleep(d).await, None => std::future::pending().await } } => {
                    return;
                }
                ready = async { match interest { Some(i) => stream.ready(i).await, None => std::future::pending().await } } => {
                    match ready {
                        Ok(r) if r.is_readable() && can_read => {
                            if !self.read(stream) {
                                self.eof = true;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            }
        }
    }

    /// Reads what is available and handles every complete request. Returns
    /// false at end of input.
    fn read<S: Stream>(&mut self, stream: &S) -> bool {
        loop {
            if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
                self.rbuf.reserve(READ_CHUNK);
            }
            match stream.read_drained(&mut self.rbuf) {
                Ok(0) => {
                    self.process();
                    return false;
                }
                Ok(n) => {
                    self.worker.stats.bytes_read.add(n as u64);
                    self.process();
                    if self.closing
                        || self.inbox.slots.borrow().len() >= self.worker.client_limits.max_pipeline
                    {
                        return true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
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
            if self.swallow > 0 {
                let n = self.swallow.min(self.rbuf.len());
                let _ = self.rbuf.split_to(n);
                self.swallow -= n;
                if self.swallow > 0 {
                    return;
                }
            }
            if self.rbuf.is_empty()
                || self.inbox.slots.borrow().len() >= self.worker.client_limits.max_pipeline
            {
                return;
            }
            match parse_request(&self.rbuf, &self.worker.limits) {
                Ok(None) => return,
                Ok(Some((req, n))) => {
                    let frame = self.rbuf.split_to(n).freeze();
                    let quit = req.command == memrelay_protocol::Command::Quit;
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    let mut slot = start(&self.worker, &self.inbox, seq, frame, req);
                    slot.worker = Some(self.worker.clone());
                    // Sub-requests that failed at once (servers down) leave
                    // the slot ready for its next step right away.
                    while slot.pending == 0 && slot.stage != Stage::Done {
                        advance(&self.worker, &self.inbox, seq, &mut slot);
                    }
                    self.inbox.slots.borrow_mut().push_back(slot);
                    if quit {
                        self.closing = true;
                    }
                }
                Err(e) => {
                    let frame = self.rbuf.split_to(e.consumed.min(self.rbuf.len())).freeze();
                    self.swallow = e.swallow;
                    self.worker.stats.client_errors.incr();
                    if let Some(key) = e.unlink_key {
                        super::dispatch::unlink(&self.worker, &frame, key.of(&frame));
                    }
                    let local = if e.kind.closes() {
                        self.closing = true;
                        Local::Close(e.kind.reply())
                    } else if e.noreply {
                        continue;
                    } else {
                        Local::Static(e.kind.reply())
                    };
                    self.next_seq += 1;
                    self.inbox.slots.borrow_mut().push_back(Slot::local(local));
                }
            }
        }
    }

    /// Takes the next step for every slot whose parts all came in.
    fn advance_ready(&mut self) {
        loop {
            std::mem::swap(&mut self.ready, &mut *self.inbox.ready.borrow_mut());
            if self.ready.is_empty() {
                return;
            }
            for &seq in &self.ready {
                let mut slots = self.inbox.slots.borrow_mut();
                let Some(slot) = seq
                    .checked_sub(self.inbox.base.get())
                    .and_then(|i| slots.get_mut(i as usize))
                else {
                    continue;
                };
                let w = slot.worker.clone().unwrap_or_else(|| self.worker.clone());
                while slot.pending == 0 && slot.stage != Stage::Done {
                    advance(&w, &self.inbox, seq, slot);
                }
            }
            self.ready.clear();
        }
    }

    /// Writes out every complete reply at the front of the FIFO.
    fn emit_ready(&mut self) {
        loop {
            let slot = {
                let mut slots = self.inbox.slots.borrow_mut();
                match slots.front() {
                    Some(s) if s.is_done() => {}
                    _ => return,
                }
                self.inbox.base.set(self.inbox.base.get() + 1);
                slots.pop_front()
            };
            let Some(mut slot) = slot else { return };
            let w = slot.worker.take().unwrap_or_else(|| self.worker.clone());
            if render(&w, slot, &mut self.out) {
                self.close_after_flush = true;
                self.closing = true;
                self.inbox.slots.borrow_mut().clear();
                return;
            }
        }
    }
}
