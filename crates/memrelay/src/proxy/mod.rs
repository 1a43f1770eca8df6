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
    /// Where `memrelay resync` requests go (None without backups).
    pub resync: Option<crate::ha::resync::Requests>,
    /// Background writes to backups (mirrors, repairs).
    pub mirror: Rc<Mirror>,
    pub stats: Arc<WorkerStats>,
    pub registry: Arc<StatsRegistry>,
    /// Where replies nobody waits for go (clean-up deletes).
    pub discard: Rc<Discard>,
}

/// A sink for fire-and-forget requests: the reply is dropped.
#[derive(Debug, Default)]
pub struct Discard;

impl Sink for Discard {
    fn deliver(&self, _token: u64, _part: u32, _result: BackendResult) {}
}

/// Bound on requests a client may have outstanding before we stop reading
/// its socket (backpressure: a client that does not read its replies stops
/// being read, without affecting anyone else).
pub const MAX_PIPELINE: usize = 1024;

/// Bound on reply bytes queued for one client before we stop reading it.
pub const MAX_PENDING_OUTPUT: usize = 4 * 1024 * 1024;
