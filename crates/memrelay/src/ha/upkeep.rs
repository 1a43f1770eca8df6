//! What a server's prober does for HA on every look at a reachable server
//! (`backend::probe` runs it through its `Watcher` trait):
//!
//! - Before a server serves again, and whenever it is reachable with keys
//!   recorded as missed, those keys are invalidated on it (pipelined
//!   deletes), or it is flushed if the list overflowed: a server never
//!   serves a value older than a write it missed. A key recorded on an up
//!   server wakes its prober at once (the server does not serve the key
//!   until then), and a server with keys listed is not marked up.
//! - A delete clears records only once the server has settled after its
//!   last failure (`ha::settle`): what it still held of writes given up
//!   on is applied first, and cannot land over a newer value after the
//!   record is gone. Until then the prober waits, at most a settle period
//!   at a time, and the keys stay listed.
//! - A key a peer recorded as held (a write it gave up on may still be
//!   on its way: `settle::Held`) is left out of the deletes until it
//!   ripens; meanwhile the prober waits for the first to ripen or for a
//!   new record, not looking at the server again and again.
//! - Once this process handed off to a new one, it deletes and flushes
//!   nothing: the new process does, and knows what a delete from here
//!   could erase.
//! - The keys deleted are then copied back from the other tier (a resync
//!   of those keys): a value written while the server missed it would
//!   otherwise have one copy until written again.
//! - A restart starts a resync. The missed keys are still deleted: a copy
//!   (resync, read repair) may have landed on the restarted server before
//!   a write that went past it was known.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::replica::Replica;
use super::resync::{Request, Requests};
use super::settle::{self, Look, Settle, Verdict};
use crate::backend::probe::{Identity, ProbeConn, Watcher};

/// Least time between two flushes of one server after its missed-key list
/// overflowed.
const FLUSH_EVERY: Duration = Duration::from_secs(60);
/// How long a prober waits before it looks again at a server whose flush
/// after an overflow is postponed: the prober would otherwise probe it
/// again at once, and again, spinning a core (a chaos run saw it).
const POSTPONED_RECHECK: Duration = Duration::from_millis(200);
/// Deletes sent per round trip while invalidating missed keys.
const DELETE_BATCH: usize = 512;

/// The upkeep of one server, owned by its prober.
#[derive(Debug)]
pub(crate) struct Upkeep {
    replica: Arc<Replica>,
    /// Where to ask for a resync when the server is seen to restart (the
    /// resync manager decides whether to).
    resyncs: Requests,
    /// When this prober last flushed the server (after its missed-key list
    /// overflowed): flushes are at least FLUSH_EVERY apart.
    last_flush: Option<tokio::time::Instant>,
    /// Whether the server settled after its last failure, and which
    /// records have aged.
    settle: Settle,
    /// The last look at the server that it answered, for held records
    /// (`settle::Held`).
    look: Option<Look>,
}

impl Upkeep {
    pub(crate) fn new(replica: Arc<Replica>, resyncs: Requests) -> Upkeep {
        Upkeep {
            replica,
            resyncs,
            last_flush: None,
            settle: Settle::default(),
            look: None,
        }
    }

    /// Whether a delete (or a flush) sent now may clear records; waits
    /// first if the server has not settled (at most a settle period).
    /// False after a wait: look at the server again first.
    async fn settled(&mut self, c: &ProbeConn) -> bool {
        let now = std::time::Instant::now();
        let verdict = self.settle.verdict(
            now,
            self.replica.last_failure(),
            settle::period(c.timeout()),
        );
        match verdict {
            Verdict::Clear => true,
            Verdict::Wait(left) => {
                tracing::debug!(server = %self.replica.name, ?left, "missed keys kept until the server settles");
                tokio::time::sleep(left).await;
                false
            }
        }
    }

    /// After a hand-off, deleting and flushing are the new process's (see
    /// `Replica::handed_off`); the keys stay listed here.
    fn handed_off(&self) -> bool {
        self.replica.handed_off.load(Ordering::Acquire)
    }

    /// After an overflow: flushes the server, unless that must wait.
    async fn flush_if_due(&mut self, c: &mut ProbeConn) -> Flush {
        let r = &self.replica;
        // The last resort, and it empties the server: not while a server
        // of another tier is down (this one may hold the only live copy of
        // keys it is not stale for; meanwhile it serves none), and at most
        // once per FLUSH_EVERY. Until then it stays stale for every key.
        let gate_open = r.flush_gate.get().is_none_or(|open| (open.0)());
        // A flush a reload could not make (the server was down), here or
        // at a peer (which tells every member to flush), does not wait:
        // it is no storm of overflows, and waiting would keep the server
        // out for a minute after it is back.
        let owed = r.flush_owed.load(Ordering::Relaxed);
        let rested = owed || self.last_flush.is_none_or(|t| t.elapsed() >= FLUSH_EVERY);
        if !gate_open || !rested {
            tracing::debug!(server = %r.name, gate_open, rested, "flush after an overflow postponed");
            return Flush::Postponed;
        }
        self.last_flush = Some(tokio::time::Instant::now());
        if !c.flush_all().await {
            return Flush::Failed;
        }
        r.missed.flushes.fetch_add(1, Ordering::Relaxed);
        if owed {
            tracing::warn!(server = %r.name, "flushed, as a reload here or at a peer asked while it could not be");
        } else {
            tracing::warn!(server = %r.name, "flushed: it could hold stale copies of more keys than are remembered");
        }
        r.flush_owed.store(false, Ordering::Relaxed);
        r.missed.clear();
        Flush::Done
    }
}

/// What became of a flush after an overflow.
enum Flush {
    Done,
    /// Not now (see `flush_if_due`): the server stays stale for every key.
    Postponed,
    /// The server did not answer it properly.
    Failed,
}

impl Watcher for Upkeep {
    fn pending(&self) -> bool {
        // After a hand-off nothing is deleted here (see `tend`): listed
        // keys are not served, and the server may serve the others.
        !self.replica.missed.is_empty() && !self.handed_off()
    }

    fn wake(&self) -> impl std::future::Future<Output = ()> {
        self.replica.missed.recorded_signal.notified()
    }

    fn seen(&mut self, who: Identity, restarted: bool, asked: std::time::Instant) {
        if restarted {
            // Its missed keys are kept: this may be seen seconds after the
            // restart, and writes it missed since then (or took, and missed
            // a delete of) are on the list too. Deleting them on an empty
            // server costs a little work and is always right.
            // Warm it back up from the other tier (if resync is automatic).
            let _ = self
                .resyncs
                .send(Request::whole(self.replica.name.clone(), true));
        }
        self.replica.set_identity(who.pid, who.boot);
        let now = std::time::Instant::now();
        self.settle.answered(now, self.replica.last_failure());
        self.look = Some(Look {
            asked,
            answered: now,
        });
    }

    async fn tend(&mut self, c: &mut ProbeConn) -> bool {
        if self.replica.missed.is_empty() {
            return true;
        }
        if self.handed_off() {
            return true;
        }
        // A flush is a delete of everything: it waits for the same.
        if !self.settled(c).await {
            return true;
        }
        // The wait above may have spanned a hand-off (and so may each
        // delete batch below).
        if self.handed_off() {
            return true;
        }
        if self.replica.missed.is_overflowed() {
            match self.flush_if_due(c).await {
                Flush::Done => {}
                Flush::Postponed => {
                    tokio::time::sleep(POSTPONED_RECHECK).await;
                    return true;
                }
                Flush::Failed => return false,
            }
        }
        let held = self.replica.missed.ripen(
            self.look,
            std::time::Instant::now(),
            settle::held_period(c.timeout()),
        );
        if !self.delete_listed(c).await {
            return false;
        }
        // A server marked down is marked up first (its prober's next look
        // comes after its backoff).
        let up = !self.replica.is_down();
        if let Some(left) = held.filter(|l| up && !l.is_zero()) {
            // Held keys ripen later: wait for the first (a new record
            // cuts it short), rather than look at the server again and
            // again meanwhile. Zero: the next look, asked now, ripens it.
            tracing::debug!(server = %self.replica.name, ?left, "held keys wait to ripen");
            tokio::select! {
                _ = tokio::time::sleep(left) => {}
                _ = self.replica.missed.recorded_signal.notified() => {}
            }
        }
        true
    }
}

impl Upkeep {
    /// Deletes the listed keys on the server (all but held ones that have
    /// not ripened), in batches, and forgets those not recorded again
    /// meanwhile. False when the server did not answer properly.
    async fn delete_listed(&mut self, c: &mut ProbeConn) -> bool {
        let missed = &self.replica.missed;
        loop {
            if self.handed_off() {
                return true;
            }
            let batch = missed.peek_batch(DELETE_BATCH);
            if batch.is_empty() {
                return true;
            }
            if !c.delete_all(&batch).await {
                return false;
            }
            // Taken before the confirm: a record the old process of a
            // hand-off sent that this count includes was learnt before
            // the confirm, so either this delete covers it or its key
            // stays listed (see `MissedKeys::forget_if_covered`).
            let seen = missed.streamed_count();
            missed.confirm(&batch);
            // Keys recorded again meanwhile stay listed: the next round
            // deletes them again, and copies them back then.
            let gone: Vec<Box<[u8]>> = batch
                .into_iter()
                .map(|(k, _)| k)
                .filter(|k| !missed.contains(k))
                .collect();
            if gone.is_empty() {
                continue;
            }
            missed.cleared(&gone, seen);
            // The values clients wrote while this server missed them live
            // on the other tier alone: copy them back (a resync of just
            // these keys, guarded like any other against client writes).
            let _ = self.resyncs.send(Request {
                server: self.replica.name.clone(),
                automatic: true,
                keys: gone,
            });
        }
    }
}
