//! Idle client connections, parked: a socket and a flag instead of a task.
//!
//! A client session waiting for its next request costs its tokio task and
//! the socket's registration with tokio, two 128-byte-aligned blocks that
//! glibc rounds up to about 900 bytes per connection (docs/performance.md).
//! Pools of mostly idle connections are the rule in front of memcached, so
//! a session idle long enough to give its buffers back (the worker's idle
//! sweep, two to four seconds) hands its socket here instead and ends.
//! The worker keeps the parked sockets in a table and watches them with one
//! epoll set of its own (mio's, registered with tokio as one descriptor):
//! 12 bytes a slot in the process (the epoll entry is kernel memory). The
//! first byte (or the close) a parked client sends makes the socket
//! readable; its session starts again from there, as a
//! session starts for a new connection, with what the old one knew that
//! outlives a request: whether the client authenticated.
//!
//! A connection stays counted while parked (`curr_connections`, `-n`), and
//! is shown as parked (`parked_connections`). TLS sessions are not parked
//! (their state is rustls's), nor sessions under `--idle-timeout` (their
//! timer is the session's). When the worker drains, every parked socket
//! gets its session back, which closes it as it closes any quiet client.

use std::cell::RefCell;
use std::io;
use std::rc::Rc;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use tokio::io::unix::AsyncFd;

use super::WorkerThread;
use crate::net::ParkedSocket as Socket;

/// How a session ended: closed, or parked with what its successor needs.
#[derive(Debug)]
pub(crate) enum Ending {
    Closed,
    Parked { socket: Socket, authenticated: bool },
}

#[derive(Debug)]
struct Entry {
    socket: Socket,
    authenticated: bool,
}

/// One worker thread's parked connections.
struct Lot {
    thread: Rc<WorkerThread>,
    conns: Arc<AtomicUsize>,
    registry: mio::Registry,
    /// Indexed by the sockets' mio tokens; `free` lists the empty slots.
    entries: RefCell<Vec<Option<Entry>>>,
    free: RefCell<Vec<usize>>,
    /// Connections parked since the worker's sweeper last asked.
    parked: std::cell::Cell<usize>,
}

thread_local! {
    static LOT: RefCell<Option<Rc<Lot>>> = const { RefCell::new(None) };
}

/// Parks `socket` on the current worker thread. Should the lot be unable
/// to watch it, the session starts again at once.
pub(crate) fn park(
    socket: Socket,
    authenticated: bool,
    thread: &Rc<WorkerThread>,
    conns: &Arc<AtomicUsize>,
) {
    let lot = match lot(thread, conns) {
        Ok(lot) => lot,
        Err(e) => {
            tracing::debug!(error = %e, "cannot park an idle connection");
            return super::accept::resume(socket, authenticated, thread, conns);
        }
    };
    let fd = socket.raw_fd();
    let idx = {
        let mut entries = lot.entries.borrow_mut();
        let idx = match lot.free.borrow_mut().pop() {
            Some(i) => i,
            None => {
                entries.push(None);
                entries.len() - 1
            }
        };
        entries[idx] = Some(Entry {
            socket,
            authenticated,
        });
        idx
    };
    let watched = lot.registry.register(
        &mut mio::unix::SourceFd(&fd),
        mio::Token(idx),
        mio::Interest::READABLE,
    );
    match watched {
        Ok(()) => {
            thread.ctx.stats.parked_connections.incr();
            lot.parked.set(lot.parked.get() + 1);
        }
        Err(e) => {
            tracing::debug!(error = %e, "cannot park an idle connection");
            if let Some(entry) = lot.take(idx) {
                super::accept::resume(entry.socket, entry.authenticated, thread, conns);
            }
        }
    }
}

/// Gives every connection parked on this worker thread its session back
/// (the worker is draining: each closes as a quiet client does).
pub(crate) fn unpark_all() {
    if let Some(lot) = LOT.with(|l| l.borrow().clone()) {
        lot.unpark_all();
    }
}

/// How many connections this worker thread parked since the last call
/// (the sweeper's: their sessions' memory is free to give back).
pub(crate) fn parked_since_last_asked() -> usize {
    LOT.with(|l| l.borrow().as_ref().map_or(0, |lot| lot.parked.replace(0)))
}

/// This thread's lot, made (with the task that watches it) the first time
/// a connection is parked.
fn lot(thread: &Rc<WorkerThread>, conns: &Arc<AtomicUsize>) -> io::Result<Rc<Lot>> {
    if let Some(lot) = LOT.with(|l| l.borrow().clone()) {
        return Ok(lot);
    }
    let poll = mio::Poll::new()?;
    let registry = poll.registry().try_clone()?;
    // SAFETY: a `mio::Poll` owns its epoll descriptor from creation to
    // drop, and `as_raw_fd` always returns that one.
    #[allow(unsafe_code)]
    let watch = unsafe { AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    let lot = Rc::new(Lot {
        thread: thread.clone(),
        conns: conns.clone(),
        registry,
        entries: RefCell::new(Vec::new()),
        free: RefCell::new(Vec::new()),
        parked: std::cell::Cell::new(0),
    });
    LOT.with(|l| *l.borrow_mut() = Some(lot.clone()));
    tokio::task::spawn_local(watch_lot(watch, lot.clone()));
    Ok(lot)
}

/// Resumes each parked connection that becomes readable.
async fn watch_lot(mut watch: AsyncFd<mio::Poll>, lot: Rc<Lot>) {
    let mut events = mio::Events::with_capacity(256);
    loop {
        let mut guard = match watch.readable_mut().await {
            Ok(g) => g,
            Err(e) => return lost_watch(&lot, &e),
        };
        // Tokio watches the set edge-triggered: empty it before saying so.
        loop {
            events.clear();
            if let Err(e) = guard
                .get_inner_mut()
                .poll(&mut events, Some(std::time::Duration::ZERO))
            {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                drop(guard);
                return lost_watch(&lot, &e);
            }
            if events.is_empty() {
                break;
            }
            for ev in events.iter() {
                lot.unpark(ev.token().0);
            }
        }
        guard.clear_ready();
    }
}

/// The lot's epoll set failed (it cannot, short of a kernel error): its
/// connections get their sessions back, and the next park makes a new
/// lot, so that no connection waits on a set nobody watches.
fn lost_watch(lot: &Lot, e: &io::Error) {
    tracing::error!(error = %e, "parked connections lost their watch: resuming them");
    LOT.with(|l| *l.borrow_mut() = None);
    lot.unpark_all();
}

impl Lot {
    fn unpark_all(&self) {
        let n = self.entries.borrow().len();
        for idx in 0..n {
            self.unpark(idx);
        }
    }

    fn take(&self, idx: usize) -> Option<Entry> {
        let entry = self.entries.borrow_mut().get_mut(idx)?.take()?;
        self.free.borrow_mut().push(idx);
        Some(entry)
    }

    /// Starts a session again for the socket parked at `idx`, if any.
    fn unpark(&self, idx: usize) {
        let Some(entry) = self.take(idx) else {
            return;
        };
        let fd = entry.socket.raw_fd();
        // Closing the descriptor would drop it from the set too, but it is
        // about to be watched by tokio's set instead, so it must leave ours.
        let _ = self.registry.deregister(&mut mio::unix::SourceFd(&fd));
        self.thread.ctx.stats.parked_connections.sub(1);
        super::accept::resume(entry.socket, entry.authenticated, &self.thread, &self.conns);
    }
}
