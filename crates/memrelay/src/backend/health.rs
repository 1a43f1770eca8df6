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

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use crate::ha::missed::MissedKeys;

#[derive(Debug)]
pub struct Health {
    pub name: String,
    /// Time from queueing a request to this server to its reply, one
    /// histogram per worker thread (each written by its own thread only).
    pub latency: Box<[crate::stats::Histogram]>,
    down: AtomicBool,
    consecutive_failures: AtomicU32,
    /// When the server last recovered (see the module comment), as
    /// nanoseconds since `epoch()`; written only while ending a streak.
    recovered_at: AtomicU64,
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
    /// A reload routed elsewhere keys this server held: the copies it kept
    /// stop being updated, and must not be served if a later reload routes
    /// those keys back to it (it is flushed first). See docs/ha.md,
    /// "Reloading the configuration".
    pub keys_moved_away: AtomicBool,
    /// The CAS stamp of the server process (`ha::cas`), from its identity.
    stamp: std::sync::atomic::AtomicU32,
    /// Whether flushing this server now loses no key's only live copy
    /// (every other server is up); installed by the topology. Unset:
    /// always.
    pub flush_gate: OnceLock<FlushGate>,
    /// Its own `stats`, `stats items` and `stats slabs`, as its prober
    /// last read them (for memrelay's `stats` and `/metrics`).
    pub figures: crate::stats::servers::ServerFigures,
}

/// See `Health::flush_gate`.
pub struct FlushGate(pub Box<dyn Fn() -> bool + Send + Sync>);

impl std::fmt::Debug for FlushGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FlushGate")
    }
}

impl Health {
    /// `threads`: worker threads, each with its own latency histogram.
    pub fn new(name: String, missed_cap: usize, threads: usize) -> Health {
        let name_for_stamp = name.clone();
        Health {
            latency: (0..threads.max(1))
                .map(|_| crate::stats::Histogram::default())
                .collect(),
            name,
            down: AtomicBool::new(false),
            consecutive_failures: AtomicU32::new(0),
            recovered_at: AtomicU64::new(0),
            downs: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            missed: MissedKeys::new(missed_cap),
            resync: Default::default(),
            copying: MissedKeys::labelled("resync copy set", 100_000),
            touched: MissedKeys::labelled("resync touched set", missed_cap),
            keys_moved_away: AtomicBool::new(false),
            stamp: std::sync::atomic::AtomicU32::new(u32::from(crate::ha::cas::stamp(
                &name_for_stamp,
                0,
                0,
            ))),
            figures: Default::default(),
            flush_gate: OnceLock::new(),
        }
    }

    /// The CAS stamp of the server process now (see `ha::cas`).
    #[inline]
    pub fn stamp(&self) -> u16 {
        self.stamp.load(Ordering::Relaxed) as u16
    }

    /// The prober read who the server process is.
    pub fn set_identity(&self, pid: u64, boot: i64) {
        let s = crate::ha::cas::stamp(&self.name, pid, boot);
        // Bit 16: the identity is known.
        self.stamp.store(u32::from(s) | 1 << 16, Ordering::Relaxed);
    }

    /// Whether the prober has read who the server process is.
    pub fn identified(&self) -> bool {
        self.stamp.load(Ordering::Relaxed) & 1 << 16 != 0
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

    /// A reply arrived: the streak of failures is over. (Only the end of a
    /// streak writes shared state, so the hot path stays a load.)
    #[inline]
    pub fn record_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            self.recovered_at
                .store(since_epoch(Instant::now()), Ordering::Relaxed);
        }
    }

    /// A connection failed. `sent` is when its oldest request was sent, if
    /// it carried one. Returns true if this marked the server down.
    pub fn record_failure(
        &self,
        limit: u32,
        why: &dyn std::fmt::Display,
        sent: Option<Instant>,
    ) -> bool {
        self.failures.fetch_add(1, Ordering::Relaxed);
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

    /// A probe succeeded: serve from this server again.
    pub fn mark_up(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.recovered_at
            .store(since_epoch(Instant::now()), Ordering::Relaxed);
        if self.down.swap(false, Ordering::AcqRel) {
            // Recovery is good news: INFO, so that WARN means "look".
            tracing::info!(server = %self.name, "server marked up");
        }
    }
}

impl crate::stats::ServerView for Health {
    fn is_down(&self) -> bool {
        Health::is_down(self)
    }

    fn counts(&self) -> crate::stats::ServerCounts {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let r = &self.resync;
        crate::stats::ServerCounts {
            failures: load(&self.failures),
            marked_down: load(&self.downs),
            missed_keys: self.missed.len() as u64,
            missed_overflowed: self.missed.is_overflowed(),
            missed_recorded: load(&self.missed.recorded),
            invalidated: load(&self.missed.invalidated),
            flushed: load(&self.missed.flushes),
            resync: crate::stats::ResyncCounts {
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

    fn latency(&self) -> &[crate::stats::Histogram] {
        &self.latency
    }

    fn figures(&self) -> &crate::stats::servers::ServerFigures {
        &self.figures
    }
}

/// Nanoseconds from a process-wide origin to `t` (0 for instants before it).
fn since_epoch(t: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    // Later than epoch + 584 years cannot happen; saturate anyway.
    u64::try_from(t.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn failures_mark_down_at_the_limit() {
        let h = Health::new("s".into(), 16, 1);
        let now = Instant::now();
        assert!(!h.record_failure(3, &"x", Some(now)));
        assert!(!h.record_failure(3, &"x", None));
        assert!(h.record_failure(3, &"x", Some(now)));
        assert!(h.is_down());
    }

    #[test]
    fn a_reply_ends_the_streak() {
        let h = Health::new("s".into(), 16, 1);
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
        let h = Health::new("s".into(), 16, 1);
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
}
