//! What the HA layer knows of each server, shared by every worker thread:
//! its liveness (`backend::health::Health`, inside), the keys it must not
//! serve, its resync, and the CAS stamp of its process.
//!
//! backend keeps a server's connections and says whether it is up; which
//! keys a server may answer for, and what it must be told before it serves
//! again, is decided here (the prober's upkeep: `ha::upkeep`).

use std::ops::Deref;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use super::missed::MissedKeys;
use crate::backend::health::Health;
use crate::backend::ServerPool;
use crate::stats::servers::ServerFigures;
use crate::stats::{Histogram, ResyncCounts, ServerCounts, ServerView};

/// One server's replica state. It derefs to its `Health`, so liveness is
/// read the same way on a replica as on a connection's server.
#[derive(Debug)]
pub(crate) struct Replica {
    /// Up or down, shared with the server's connections and its prober.
    live: Arc<Health>,
    /// Keys this server must not serve until they are invalidated on it.
    pub missed: MissedKeys,
    /// Its background resync, if any.
    pub resync: super::resync::Progress,
    /// Keys a resync is copying to this server right now: it does not serve
    /// them until the copy is known not to have raced a client's write.
    pub copying: MissedKeys,
    /// Keys clients wrote while a resync of this server ran.
    pub touched: MissedKeys,
    /// A reload routed elsewhere keys this server held: the copies it kept
    /// stop being updated, and must not be served if a later reload routes
    /// those keys back to it (it is flushed first). See docs/ha.md,
    /// "Reloading the configuration".
    pub keys_moved_away: AtomicBool,
    /// A reload's flush of this server failed (it was down): its prober
    /// flushes it as soon as it can, without the rest between flushes
    /// after overflows (`ha::upkeep`).
    pub flush_owed: AtomicBool,
    /// This process handed its sockets and lists to a new memrelay
    /// (`--handoff`), which now deletes the missed keys: this one must
    /// not. Its delete of K could land after the new process cleared K
    /// and wrote K here alone (the other replica down), erasing the only
    /// copy of an acknowledged value. While it drains it still does not
    /// serve its listed keys from here.
    pub handed_off: AtomicBool,
    /// The CAS stamp of the server process (`ha::cas`), from its identity.
    stamp: AtomicU32,
    /// Whether flushing this server now loses no key's only live copy
    /// (every other server is up); installed by the topology. Unset:
    /// always.
    pub flush_gate: OnceLock<FlushGate>,
}

/// See `Replica::flush_gate`.
pub(crate) struct FlushGate(pub Box<dyn Fn() -> bool + Send + Sync>);

impl std::fmt::Debug for FlushGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FlushGate")
    }
}

impl Deref for Replica {
    type Target = Health;

    fn deref(&self) -> &Health {
        &self.live
    }
}

impl Replica {
    /// `threads`: worker threads, each with its own latency histogram.
    pub(crate) fn new(name: String, missed_cap: usize, threads: usize) -> Replica {
        let stamp = u32::from(super::cas::stamp(&name, 0, 0));
        Replica {
            live: Arc::new(Health::new(name.clone(), threads)),
            missed: MissedKeys::of_server(&name, missed_cap),
            resync: Default::default(),
            copying: MissedKeys::labelled("resync copy set", 100_000),
            touched: MissedKeys::labelled("resync touched set", missed_cap),
            keys_moved_away: AtomicBool::new(false),
            flush_owed: AtomicBool::new(false),
            handed_off: AtomicBool::new(false),
            stamp: AtomicU32::new(stamp),
            flush_gate: OnceLock::new(),
        }
    }

    /// Its liveness, for the connections to the server and its prober.
    pub(crate) fn live(&self) -> &Arc<Health> {
        &self.live
    }

    /// The CAS stamp of the server process now (see `ha::cas`).
    #[inline]
    pub(crate) fn stamp(&self) -> u16 {
        self.stamp.load(Ordering::Relaxed) as u16
    }

    /// The prober read who the server process is.
    pub(crate) fn set_identity(&self, pid: u64, boot: i64) {
        let s = super::cas::stamp(&self.name, pid, boot);
        // Bit 16: the identity is known.
        self.stamp.store(u32::from(s) | 1 << 16, Ordering::Relaxed);
    }

    /// Whether the prober has read who the server process is.
    pub(crate) fn identified(&self) -> bool {
        self.stamp.load(Ordering::Relaxed) & 1 << 16 != 0
    }

    /// Whether this server may answer for `key`: it is up and holds no
    /// stale copy of it.
    #[inline]
    pub(crate) fn serves(&self, key: &[u8]) -> bool {
        !self.is_down() && !self.missed.contains(key) && !self.copying.contains(key)
    }

    /// A client write for `key` involves this server: a resync running for
    /// it must not trust a copy of `key` it is making.
    #[inline]
    pub(crate) fn note_write(&self, key: &[u8]) {
        if self.resync.is_running() {
            self.touched.record(key);
        }
    }
}

impl ServerView for Replica {
    fn is_down(&self) -> bool {
        self.live.is_down()
    }

    fn counts(&self) -> ServerCounts {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let r = &self.resync;
        ServerCounts {
            failures: load(&self.failures),
            marked_down: load(&self.downs),
            missed_keys: self.missed.len() as u64,
            missed_overflowed: self.missed.is_overflowed(),
            missed_recorded: load(&self.missed.recorded),
            invalidated: load(&self.missed.invalidated),
            flushed: load(&self.missed.flushes),
            resync: ResyncCounts {
                state: r.state(),
                running: r.is_running(),
                runs: load(&r.runs),
                scanned: load(&r.scanned),
                selected: load(&r.selected),
                copied: load(&r.copied),
                skipped: load(&r.skipped),
                errors: load(&r.errors),
                rate: load(&r.rate),
                eta: load(&r.eta),
            },
        }
    }

    fn latency(&self) -> &[Histogram] {
        &self.latency
    }

    fn figures(&self) -> &ServerFigures {
        &self.figures
    }
}

/// One server as a worker's requests use it: this thread's connections to
/// it (`P`: a `ServerPool`, or the in-process tests' fake), and its replica
/// state. Derefs to the connections.
#[derive(Debug)]
pub(crate) struct Server<P = ServerPool> {
    pool: Rc<P>,
    replica: Arc<Replica>,
}

impl<P> Clone for Server<P> {
    fn clone(&self) -> Self {
        Server {
            pool: self.pool.clone(),
            replica: self.replica.clone(),
        }
    }
}

impl<P> Server<P> {
    pub(crate) fn new(pool: Rc<P>, replica: Arc<Replica>) -> Server<P> {
        Server { pool, replica }
    }

    /// Its replica state (named as before the split, for the call sites).
    pub(crate) fn health(&self) -> &Arc<Replica> {
        &self.replica
    }
}

impl<P> Deref for Server<P> {
    type Target = P;

    fn deref(&self) -> &P {
        &self.pool
    }
}
