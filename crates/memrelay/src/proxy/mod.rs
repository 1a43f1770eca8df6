//! Client sessions: read requests, route them, fan them out to servers, and
//! answer in request order.
//!
//! - [`session`]: the per-connection loop (read, parse, dispatch, reply);
//! - [`dispatch`]: one request -> the sub-requests sent to servers;
//! - [`reply`]: the sub-replies -> the bytes the client gets.
//!
//! A [`Worker`] is everything one worker thread shares among its sessions:
//! the routing table, its own connections to every server, its counters.

pub mod dispatch;
pub mod reply;
pub mod session;
pub mod slot;

use std::rc::Rc;
use std::sync::Arc;

use memrelay_protocol::Limits;

use crate::backend::{BackendResult, ServerPool, Sink};
use crate::ha::mirror::Mirror;
use crate::router::Router;
use crate::stats::{StatsRegistry, WorkerStats};

/// Per-thread state shared by that thread's sessions.
#[derive(Debug)]
pub struct Worker {
    pub id: usize,
    pub router: Router,
    /// Primaries then backups, indexed like `Config::servers`.
    pub servers: Rc<[ServerPool]>,
    pub limits: Limits,
    /// Ask the backup when the primary misses.
    pub miss_fallback: bool,
    /// No backups: move a dead server's keys to the next server on the ring.
    pub auto_eject: bool,
    /// `flush_all` is allowed (`--enable-flush-all`).
    pub flush_enabled: bool,
    /// Clients must authenticate first (`--auth-file`).
    pub auth: Option<Arc<crate::config::auth::Credentials>>,
    pub client_limits: ClientLimits,
    /// Where `memrelay resync` requests go (None without backups).
    pub resync: Option<crate::ha::resync::Requests>,
    /// Set on SIGTERM (or a hand-over) to when the drain began: sessions
    /// finish what they were sent, then close (see `session::DRAIN_QUIET`).
    pub draining: std::cell::Cell<Option<std::time::Instant>>,
    /// Every session's inbox, to wake idle sessions when draining starts.
    pub sessions: std::cell::RefCell<Vec<std::rc::Weak<session::Inbox>>>,
    /// Background writes to backups (mirrors, repairs).
    pub mirror: Rc<Mirror>,
    pub stats: Arc<WorkerStats>,
    pub registry: Arc<StatsRegistry>,
    /// Where replies nobody waits for go (clean-up deletes).
    pub discard: Rc<Discard>,
}

impl Worker {
    /// Starts draining: every session answers what it is sent until it goes
    /// quiet (or for at most `DRAIN_BUSY`), then closes.
    pub fn drain(&self) {
        self.draining.set(Some(std::time::Instant::now()));
        for inbox in self.sessions.borrow_mut().drain(..) {
            if let Some(inbox) = inbox.upgrade() {
                inbox.wake();
            }
        }
    }

    /// Asks every session idle since the last sweep to give its buffers
    /// back (see `session::Inbox::sweep_idle`); forgets ended sessions.
    /// Returns how many were asked.
    pub fn sweep_idle(&self) -> usize {
        let mut asked = 0;
        let mut sessions = self.sessions.borrow_mut();
        sessions.retain(|s| match s.upgrade() {
            Some(inbox) => {
                asked += usize::from(inbox.sweep_idle());
                true
            }
            None => false,
        });
        asked
    }

    /// Remembers a session so `drain` can reach it.
    pub fn register(&self, inbox: &Rc<session::Inbox>) {
        let mut sessions = self.sessions.borrow_mut();
        if sessions.len() >= 64 && sessions.len() == sessions.capacity() {
            // Forget sessions that ended before growing the list.
            sessions.retain(|s| s.strong_count() > 0);
        }
        sessions.push(Rc::downgrade(inbox));
    }
}

/// A sink for fire-and-forget requests: the reply is dropped.
#[derive(Debug, Default)]
pub struct Discard;

impl Sink for Discard {
    fn deliver(&self, _token: u64, _part: u32, _result: BackendResult) {}
}

/// Bounds on one client connection.
#[derive(Debug, Clone)]
pub struct ClientLimits {
    /// Requests a client may have outstanding before its socket is not read
    /// (backpressure: a client that does not read its replies stops being
    /// read, without affecting anyone else).
    pub max_pipeline: usize,
    /// Reply bytes a client may be owed (queued, or held for requests not
    /// yet answered) before it is not read and nothing more it sent is
    /// dispatched.
    pub max_buffer: usize,
    /// Most reply bytes one request may bring (`--max-reply-size`); also
    /// how far past `max_buffer` a client's replies may go before a read's
    /// reply is dropped.
    pub max_reply: usize,
    /// Close a client idle this long (nothing sent, nothing outstanding).
    pub idle_timeout: Option<std::time::Duration>,
}
