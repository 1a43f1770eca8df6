//! Whether a server is up, shared by every worker thread.
//!
//! A server is marked down after `failure_limit` consecutive failures (a
//! failed connect, a timeout, a broken reply: each failed connection counts
//! once, however many requests it carried) and up again when a probe
//! succeeds. Marking is rare and done with atomics; the hot path only loads
//! one flag. A state change is logged once, by whoever made it.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::ha::missed::MissedKeys;

#[derive(Debug)]
pub struct Health {
    pub name: String,
    down: AtomicBool,
    consecutive_failures: AtomicU32,
    /// Times this server was marked down (for `stats`).
    pub downs: AtomicU64,
    /// Failed connections or requests, in total (for `stats`).
    pub failures: AtomicU64,
    /// Keys this server must not serve until they are invalidated on it.
    pub missed: MissedKeys,
    /// Its background resync, if any.
    pub resync: crate::ha::resync::Progress,
    /// Keys a resync is copying to this server right now: it does not serve
    /// them until the copy is known not to have raced a client's write.
    pub copying: MissedKeys,
    /// Keys clients wrote while a resync of this server ran.
    pub touched: MissedKeys,
}

impl Health {
    pub fn new(name: String, missed_cap: usize) -> Health {
        Health {
            name,
            down: AtomicBool::new(false),
            consecutive_failures: AtomicU32::new(0),
            downs: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            missed: MissedKeys::new(missed_cap),
            resync: Default::default(),
            copying: MissedKeys::labelled("resync copy set", 100_000),
            touched: MissedKeys::labelled("resync touched set", missed_cap),
        }
    }

    /// Whether this server may answer for `key`: it is up and holds no
    /// stale copy of it.
    #[inline]
    pub fn serves(&self, key: &[u8]) -> bool {
        !self.is_down() && !self.missed.contains(key) && !self.copying.contains(key)
    }

    /// A client write for `key` involves this server: a resync running for
    /// it must not trust a copy of `key` it is making.
    #[inline]
    pub fn note_write(&self, key: &[u8]) {
        if self.resync.is_running() {
            self.touched.record(key);
        }
    }

    #[inline]
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// A reply arrived: the streak of failures is over.
    #[inline]
    pub fn record_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// A connection failed. Returns true if this marked the server down.
    pub fn record_failure(&self, limit: u32, why: &dyn std::fmt::Display) -> bool {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= limit && !self.down.swap(true, Ordering::AcqRel) {
            self.downs.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(server = %self.name, failures = n, reason = %why, "server marked down");
            return true;
        }
        tracing::debug!(server = %self.name, failures = n, reason = %why, "server failure");
        false
    }

    /// A probe succeeded: serve from this server again.
    pub fn mark_up(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if self.down.swap(false, Ordering::AcqRel) {
            tracing::warn!(server = %self.name, "server marked up");
        }
    }
}
