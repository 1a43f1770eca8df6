//! Client sessions: read requests, route them, fan them out to servers, and
//! answer in request order.
//!
//! - [`session`]: the per-connection loop (read, parse, dispatch, reply);
//! - [`dispatch`]: one request -> the sub-requests sent to servers;
//! - [`reply`]: the sub-replies -> the bytes the client gets.
//!
//! A [`Worker`] is what one worker thread's sessions dispatch with under one
//! configuration: the routing table, the thread's connections to every
//! server, the limits and policies. It is immutable; a reload builds a new
//! one ([`Worker::build`]) and the [`WorkerThread`] swaps it in between
//! requests (see `crate::topology` for the barrier). A request keeps the
//! `Worker` it started with until it is answered.

pub(crate) mod accept;
pub(crate) mod dispatch;
mod fence;
pub(crate) mod park;
pub(crate) mod reply;
pub(crate) mod session;
pub(crate) mod slot;

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Instant;

use memrelay_protocol::Limits;

use crate::backend::connect::Dial;
use crate::backend::{BackendSettings, ServerPool};
use crate::ha::mirror::Mirror;
use crate::ha::replica::Server;
use crate::ha::Cluster;
use crate::stats::{StatsRegistry, WorkerStats};
use crate::topology::{ReloadRequests, Topology, WorkerEvent, WorkerEvents};

/// One worker thread's view of one configuration.
#[derive(Debug)]
pub(crate) struct Worker {
    /// The configuration's generation (see `Topology`).
    pub generation: u64,
    /// Routing, servers and what the HA steps use (`Worker` derefs to it).
    pub cluster: Cluster,
    pub limits: Limits,
    /// `flush_all` is allowed (`--enable-flush-all`).
    pub flush_enabled: bool,
    /// Clients must authenticate first (`--auth-file`).
    pub auth: Option<Arc<crate::config::auth::Credentials>>,
    pub client_limits: ClientLimits,
    /// `-n`: client connections accepted at once (over every worker).
    pub max_conns: usize,
    /// What a TLS listener's new clients are served with (a reload reads
    /// the certificate files again).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The timeouts and bounds of server connections under this
    /// configuration (installed in the thread's shared copy).
    pub backend: BackendSettings,
    /// Where `memrelay resync` requests go (None without backups).
    pub resync: Option<crate::ha::resync::Requests>,
    /// Where `memrelay reload` requests go.
    pub reload: Option<ReloadRequests>,
    pub registry: Arc<StatsRegistry>,
    /// Spacing of `memrelay resync` requests (see [`AdminPace`]).
    pub admin: AdminPace,
    /// Told when this `Worker` is dropped: its last request is done.
    events: Option<WorkerEvents>,
}

impl std::ops::Deref for Worker {
    type Target = Cluster;

    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(events) = &self.events {
            let _ = events.send(WorkerEvent::Retired {
                generation: self.generation,
            });
        }
    }
}

/// What a worker thread keeps whatever the configuration.
#[derive(Debug)]
pub(crate) struct ThreadContext {
    pub stats: Arc<WorkerStats>,
    pub registry: Arc<StatsRegistry>,
    pub resync: crate::ha::resync::Requests,
    pub reload: Option<ReloadRequests>,
    pub events: Option<WorkerEvents>,
    /// The thread's server-connection settings, read by every connection
    /// at each use: installing a configuration changes them in place.
    pub backend: Rc<Cell<BackendSettings>>,
}

impl Worker {
    /// This thread's view of `topo`. The connection pools of `previous`
    /// are reused for every server that stays (same name, same address,
    /// same health), so a key's requests keep their connection.
    pub(crate) fn build(ctx: &ThreadContext, topo: &Topology, previous: Option<&Worker>) -> Worker {
        let cfg = &topo.config;
        let servers: Rc<[Server]> = cfg
            .servers()
            .zip(&topo.health)
            .map(|(s, health)| {
                let kept = previous.and_then(|p| {
                    p.servers.iter().find(|pool| {
                        pool.name == s.name
                            && pool.addr() == s.addr
                            && Arc::ptr_eq(pool.health(), health)
                    })
                });
                match kept {
                    Some(pool) => {
                        // New connections use the certificates read now.
                        pool.redial(Dial::to(s, cfg.server_tls.as_ref()));
                        pool.clone()
                    }
                    None => Server::new(
                        Rc::new(ServerPool::new(
                            s.name.clone(),
                            Dial::to(s, cfg.server_tls.as_ref()),
                            cfg.backend_conns,
                            health.live().clone(),
                            ctx.backend.clone(),
                        )),
                        health.clone(),
                    ),
                }
            })
            .collect();
        Worker {
            generation: topo.generation,
            cluster: Cluster {
                router: topo.router.clone(),
                mirror: Mirror::new(servers.clone(), ctx.stats.clone()),
                servers,
                miss_fallback: cfg.miss_fallback,
                auto_eject: cfg.auto_eject,
                stats: ctx.stats.clone(),
                transition: topo.transition.clone(),
            },
            limits: cfg.limits.clone(),
            flush_enabled: cfg.flush_enabled,
            auth: cfg.auth.clone(),
            client_limits: ClientLimits {
                max_pipeline: cfg.max_pipeline,
                max_buffer: cfg.max_client_buffer,
                max_reply: cfg.max_reply_size,
                idle_timeout: cfg.idle_timeout,
                write_timeout: cfg.write_timeout,
                handshake_timeout: cfg.handshake_timeout,
                max_memory: cfg.max_memory / cfg.threads.max(1),
            },
            max_conns: cfg.max_conns,
            tls: cfg.tls.as_ref().map(|t| t.server.clone()),
            backend: BackendSettings::of(cfg),
            resync: (!cfg.backups.is_empty()).then(|| ctx.resync.clone()),
            reload: ctx.reload.clone(),
            registry: ctx.registry.clone(),
            admin: AdminPace::default(),
            events: ctx.events.clone(),
        }
    }
}

/// One worker thread: its sessions, and the configuration they use now.
#[derive(Debug)]
pub(crate) struct WorkerThread {
    pub ctx: ThreadContext,
    /// Set on SIGTERM (or a hand-over) to when the drain began: sessions
    /// finish what they were sent, then close (see `session::DRAIN_QUIET`).
    pub draining: Cell<Option<Instant>>,
    /// Every session's inbox, to wake sessions when draining starts or a
    /// configuration is installed.
    pub sessions: RefCell<Vec<Weak<session::Inbox>>>,
    /// The configuration new requests use.
    current: RefCell<Rc<Worker>>,
    /// Its generation, for sessions to compare theirs with (one load).
    generation: Cell<u64>,
    /// Between the two phases of a swap: sessions start no new request.
    paused: Cell<bool>,
}

impl WorkerThread {
    pub(crate) fn new(ctx: ThreadContext, topo: &Topology) -> WorkerThread {
        let worker = Worker::build(&ctx, topo, None);
        ctx.backend.set(worker.backend);
        WorkerThread {
            ctx,
            draining: Cell::new(None),
            sessions: RefCell::new(Vec::new()),
            generation: Cell::new(worker.generation),
            current: RefCell::new(Rc::new(worker)),
            paused: Cell::new(false),
        }
    }

    /// The configuration new requests use.
    pub(crate) fn current(&self) -> Rc<Worker> {
        self.current.borrow().clone()
    }

    /// Whether `w` is still the configuration new requests use.
    #[inline]
    pub(crate) fn is_current(&self, w: &Worker) -> bool {
        w.generation == self.generation.get()
    }

    /// Whether sessions may start new requests.
    #[inline]
    pub(crate) fn is_paused(&self) -> bool {
        self.paused.get()
    }

    /// Phase one of a swap: build this thread's view of `topo` and stop
    /// starting requests until [`install`](Self::install).
    pub(crate) fn prepare(&self, topo: &Topology) -> Worker {
        let next = Worker::build(&self.ctx, topo, Some(&self.current()));
        self.paused.set(true);
        next
    }

    /// Phase two: new requests use `next`; sessions are woken to pick it up
    /// (an idle one lets go of the old configuration, so that connections
    /// only it used can close).
    pub(crate) fn install(&self, next: Worker) {
        self.ctx.backend.set(next.backend);
        self.generation.set(next.generation);
        *self.current.borrow_mut() = Rc::new(next);
        self.paused.set(false);
        self.wake_sessions();
    }

    /// Starts draining: every session answers what it is sent until it goes
    /// quiet (or for at most `DRAIN_BUSY`), then closes.
    pub(crate) fn drain(&self) {
        self.draining.set(Some(Instant::now()));
        self.wake_sessions();
    }

    /// Asks every session idle since the last sweep to give its buffers
    /// back (see `session::Inbox::sweep_idle`); forgets ended sessions.
    /// Returns how many were asked.
    pub(crate) fn sweep_idle(&self) -> usize {
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

    fn wake_sessions(&self) {
        let mut sessions = self.sessions.borrow_mut();
        sessions.retain(|s| match s.upgrade() {
            Some(inbox) => {
                inbox.wake();
                true
            }
            None => false,
        });
    }

    /// Remembers a session so `drain` and `install` can reach it.
    pub(crate) fn register(&self, inbox: &Rc<session::Inbox>) {
        let mut sessions = self.sessions.borrow_mut();
        if sessions.len() >= 64 && sessions.len() == sessions.capacity() {
            // Forget sessions that ended before growing the list.
            sessions.retain(|s| s.strong_count() > 0);
        }
        sessions.push(Rc::downgrade(inbox));
    }
}

/// Least time between two resyncs of one server this worker asks for: a
/// client pipelining thousands of `memrelay resync` lines once queued as
/// many requests, each logged. Those in between are answered `OK`: a
/// resync of that server is asked for, or running, already.
const RESYNC_SPACING: std::time::Duration = std::time::Duration::from_secs(1);

/// When this worker last asked for each server's resync.
#[derive(Debug, Default)]
pub(crate) struct AdminPace {
    resyncs: RefCell<Vec<(String, Instant)>>,
}

impl AdminPace {
    /// Whether a resync of `server` is to be asked for now (and if so,
    /// notes it).
    pub(crate) fn resync_due(&self, server: &str) -> bool {
        let now = Instant::now();
        let mut recent = self.resyncs.borrow_mut();
        recent.retain(|(_, at)| now.duration_since(*at) < RESYNC_SPACING);
        if recent.iter().any(|(name, _)| name == server) {
            return false;
        }
        recent.push((server.to_string(), now));
        true
    }
}

/// Bounds on one client connection.
#[derive(Debug, Clone)]
pub(crate) struct ClientLimits {
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
    /// Close a client owed replies whose socket takes none for this long
    /// (it would otherwise pin them for ever).
    pub write_timeout: std::time::Duration,
    /// Close a client that has not authenticated (or finished its TLS
    /// handshake) and sends nothing for this long.
    pub handshake_timeout: std::time::Duration,
    /// Bytes this worker's clients may hold in all (`--max-memory` shared
    /// equally by the workers, so the check is the worker's own).
    pub max_memory: usize,
}
