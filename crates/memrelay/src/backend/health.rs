//! Whether a server is up, shared by every worker thread.
//!
//! A server is marked down after `failure_limit` consecutive failures (a
//! failed connect, a timeout, a broken reply: each failed connection counts
//! once, however many requests it carried) and up again when a probe
//! succeeds. Marking is rare and done with atomics; the hot path only loads
//! one flag. A state change is logged once, by whoever made it.
//!
//! A failure of a request sent *before* the server last recovered (a reply
//! ended a failure streak, or a probe marked it up) does not count: after a
//! stall (a SIGSTOP, a long GC-like pause, a congested link) the server
//! answers again while requests queued during the stall are still timing
//! out, and those must not mark a server down that has just proved alive.
//!
//! Each failure, counted or not, and each failed probe also stamps when it
//! happened (`last_failure`): a request given up on may still sit in the
//! server's socket buffer, to be applied later, and the HA layer waits for
//! the server to settle after its last failure before it trusts a delete
//! (`ha::upkeep`). Only failures write it; a reply writes nothing.
//!
//! Liveness only: what a server must not serve (missed keys), resyncs and
//! the CAS stamp of its process are the HA layer's (`ha::replica`), which
//! keeps a `Health` inside each replica's state.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

#[derive(Debug)]
pub(crate) struct Health {
    pub name: String,
    /// Time from queueing a request to this server to its reply, one
    /// histogram per worker thread (each written by its own thread only).
    pub latency: Box<[crate::stats::Histogram]>,
    down: AtomicBool,
    consecutive_failures: AtomicU32,
    /// When the server last recovered (see the module comment), as
    /// nanoseconds since `epoch()`; written only while ending a streak.
    recovered_at: AtomicU64,
    /// When the server last failed (a connection, a request, a probe), as
    /// nanoseconds since `epoch()`, 0 for never; written on failures only.
    failed_at: AtomicU64,
    /// Times this server was marked down (for `stats`).
    pub downs: AtomicU64,
    /// Failed connections or requests, in total (for `stats`).
    pub failures: AtomicU64,
    /// Its own `stats`, `stats items` and `stats slabs`, as its prober
    /// last read them (for memrelay's `stats` and `/metrics`).
    pub figures: crate::stats::servers::ServerFigures,
}

impl Health {
    /// `threads`: worker threads, each with its own latency histogram.
    pub(crate) fn new(name: String, threads: usize) -> Health {
        Health {
            latency: (0..threads.max(1))
                .map(|_| crate::stats::Histogram::default())
                .collect(),
            name,
            down: AtomicBool::new(false),
            consecutive_failures: AtomicU32::new(0),
            recovered_at: AtomicU64::new(0),
            failed_at: AtomicU64::new(0),
            downs: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            figures: Default::default(),
        }
    }

    #[inline]
    pub(crate) fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// A reply arrived: the streak of failures is over. (Only the end of a
    /// streak writes shared state, so the hot path stays a load.)
    #[inline]
    pub(crate) fn record_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            self.recovered_at
                .store(since_epoch(Instant::now()), Ordering::Relaxed);
        }
    }

    /// A connection failed. `sent` is when its oldest request was sent, if
    /// it carried one. Returns true if this marked the server down.
    pub(crate) fn record_failure(
        &self,
        limit: u32,
        why: &dyn std::fmt::Display,
        sent: Option<Instant>,
    ) -> bool {
        self.failures.fetch_add(1, Ordering::Relaxed);
        // Stamped even when the failure does not count: the request it
        // gave up on may still reach the server.
        self.note_failure();
        if let Some(sent) = sent {
            if since_epoch(sent) < self.recovered_at.load(Ordering::Relaxed) {
                tracing::debug!(server = %self.name, reason = %why, "failure of a request sent before the server recovered: not counted");
                return false;
            }
        }
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= limit && !self.down.swap(true, Ordering::AcqRel) {
            self.downs.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(server = %self.name, failures = n, reason = %why, "server marked down");
            return true;
        }
        tracing::debug!(server = %self.name, failures = n, reason = %why, "server failure");
        false
    }

    /// The server failed now (its prober saw it: a probe that was not
    /// answered). Counts nothing: probes do not mark a server down.
    pub(crate) fn note_failure(&self) {
        // 0 means "never": an instant at the epoch itself is one past it.
        let now = since_epoch(Instant::now()).max(1);
        self.failed_at.store(now, Ordering::Relaxed);
    }

    /// When the server last failed, if it ever did. (Relaxed: a failure not
    /// seen yet is a moment old, and what it records is younger than any
    /// record a delete may clear, which must be a settle period old.)
    pub(crate) fn last_failure(&self) -> Option<Instant> {
        match self.failed_at.load(Ordering::Relaxed) {
            0 => None,
            n => Some(at_epoch(n)),
        }
    }

    /// A probe succeeded: serve from this server again.
    pub(crate) fn mark_up(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.recovered_at
            .store(since_epoch(Instant::now()), Ordering::Relaxed);
        if self.down.swap(false, Ordering::AcqRel) {
            // Recovery is good news: INFO, so that WARN means "look".
            tracing::info!(server = %self.name, "server marked up");
        }
    }
}

/// The process-wide origin the stamps count from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds from a process-wide origin to `t` (0 for instants before it).
fn since_epoch(t: Instant) -> u64 {
    // Later than epoch + 584 years cannot happen; saturate anyway.
    u64::try_from(t.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

/// The instant `nanos` after the origin (`since_epoch` undone).
fn at_epoch(nanos: u64) -> Instant {
    epoch() + std::time::Duration::from_nanos(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn failures_mark_down_at_the_limit() {
        let h = Health::new("s".into(), 1);
        let now = Instant::now();
        assert!(!h.record_failure(3, &"x", Some(now)));
        assert!(!h.record_failure(3, &"x", None));
        assert!(h.record_failure(3, &"x", Some(now)));
        assert!(h.is_down());
    }

    #[test]
    fn a_reply_ends_the_streak() {
        let h = Health::new("s".into(), 1);
        h.record_failure(3, &"x", None);
        h.record_failure(3, &"x", None);
        h.record_success();
        let later = Instant::now() + Duration::from_millis(1);
        assert!(!h.record_failure(3, &"x", Some(later)));
        assert!(!h.record_failure(3, &"x", Some(later)));
        assert!(!h.is_down());
        assert!(h.record_failure(3, &"x", Some(later)));
    }

    #[test]
    fn requests_sent_before_a_recovery_do_not_count() {
        let h = Health::new("s".into(), 1);
        let stalled = Instant::now();
        h.record_failure(3, &"x", Some(stalled));
        // The server answers again (the stall is over) ...
        h.record_success();
        // ... while requests queued during the stall time out.
        for _ in 0..10 {
            assert!(!h.record_failure(3, &"timeout", Some(stalled)));
        }
        assert!(!h.is_down());
        // Connect failures carry no request: they still count.
        h.record_failure(3, &"connect", None);
        h.record_failure(3, &"connect", None);
        assert!(h.record_failure(3, &"connect", None));
        assert!(h.is_down());
    }

    #[test]
    fn every_failure_is_stamped_counted_or_not() {
        let h = Health::new("s".into(), 1);
        assert_eq!(h.last_failure(), None);
        let stalled = Instant::now();
        h.record_success();
        h.mark_up();
        assert_eq!(h.last_failure(), None, "replies stamp nothing");
        // Not counted (sent before the recovery), stamped all the same.
        let before = Instant::now();
        assert!(!h.record_failure(3, &"timeout", Some(stalled)));
        let first = h.last_failure().expect("stamped");
        assert!(first >= before && first <= Instant::now());
        // A failed probe counts nothing and stamps.
        h.note_failure();
        assert!(h.last_failure().expect("stamped") >= first);
        assert_eq!(h.failures.load(Ordering::Relaxed), 1);
    }
}
