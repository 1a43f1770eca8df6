//! The keys a server missed writes for, so it never serves them stale.
//!
//! When a write for key K goes past a server (it was down, unreachable, or
//! timed out, so the write was applied elsewhere), that server's copy of K
//! may now be older than the truth. K is recorded here; from then on the
//! server is treated as unavailable *for K* (reads and writes of K go to the
//! next replica) until the prober has deleted K on it. Memory is bounded:
//! past `cap` keys the set overflows, the server is stale for every key, and
//! it must be flushed (or be seen to have restarted empty) before it serves
//! again.
//!
//! The hot path only loads `count`, which is zero whenever nothing was
//! missed; the lock is taken only during failure episodes.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

#[derive(Debug)]
pub struct MissedKeys {
    /// What the set is for, in its log lines.
    label: &'static str,
    /// Number of keys recorded, or 1 while overflowed; 0 means "nothing
    /// missed" and lets readers skip the lock.
    count: AtomicUsize,
    inner: Mutex<Inner>,
    cap: usize,
    /// Keys ever recorded (for `stats`).
    pub recorded: AtomicU64,
    /// Keys deleted on the server after it came back (for `stats`).
    pub invalidated: AtomicU64,
    /// Whole-server flushes because the set overflowed (for `stats`).
    pub flushes: AtomicU64,
}

#[derive(Debug, Default)]
struct Inner {
    keys: HashSet<Box<[u8]>>,
    overflowed: bool,
}

impl MissedKeys {
    pub fn new(cap: usize) -> MissedKeys {
        MissedKeys::labelled("missed-key list", cap)
    }

    /// A set of keys for another purpose (keys being copied by a resync,
    /// keys written during one), with the same bounds.
    pub fn labelled(label: &'static str, cap: usize) -> MissedKeys {
        MissedKeys {
            label,
            count: AtomicUsize::new(0),
            inner: Mutex::new(Inner::default()),
            cap: cap.max(1),
            recorded: AtomicU64::new(0),
            invalidated: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the set inconsistent
        // in a way that matters (worst case: a key is missing and a stale
        // read is possible), so poisoning is ignored rather than spread.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the server may hold a stale copy of `key`.
    #[inline]
    pub fn contains(&self, key: &[u8]) -> bool {
        if self.count.load(Ordering::Acquire) == 0 {
            return false;
        }
        let inner = self.lock();
        inner.overflowed || inner.keys.contains(key)
    }

    pub fn is_empty(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    pub fn is_overflowed(&self) -> bool {
        !self.is_empty() && self.lock().overflowed
    }

    pub fn len(&self) -> usize {
        self.lock().keys.len()
    }

    /// Records that a write for `key` went past this server.
    pub fn record(&self, key: &[u8]) {
        self.recorded.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        if inner.overflowed || inner.keys.contains(key) {
            return;
        }
        if inner.keys.len() >= self.cap {
            inner.overflowed = true;
            inner.keys = HashSet::new();
            self.count.store(1, Ordering::Release);
            tracing::warn!(
                cap = self.cap,
                set = self.label,
                "key set overflowed: it now covers every key"
            );
            return;
        }
        inner.keys.insert(key.into());
        self.count.store(inner.keys.len(), Ordering::Release);
    }

    /// The server missed a write to every key (a `flush_all`): it must be
    /// flushed before it serves again.
    pub fn record_all(&self) {
        let mut inner = self.lock();
        inner.overflowed = true;
        inner.keys = HashSet::new();
        self.count.store(1, Ordering::Release);
    }

    /// Takes up to `n` keys to invalidate. They stay "missed" (readers keep
    /// bypassing the server for them) until `confirm` is called.
    pub fn peek_batch(&self, n: usize) -> Vec<Box<[u8]>> {
        self.lock().keys.iter().take(n).cloned().collect()
    }

    /// The keys were deleted on the server: it no longer holds them stale.
    pub fn confirm(&self, keys: &[Box<[u8]>]) {
        let mut inner = self.lock();
        for k in keys {
            inner.keys.remove(k);
        }
        self.invalidated
            .fetch_add(keys.len() as u64, Ordering::Relaxed);
        self.count.store(
            if inner.overflowed {
                1
            } else {
                inner.keys.len()
            },
            Ordering::Release,
        );
    }

    /// Removes keys without counting them as invalidated.
    pub fn confirm_quietly(&self, keys: &[Box<[u8]>]) {
        let mut inner = self.lock();
        for k in keys {
            inner.keys.remove(k);
        }
        self.count.store(
            if inner.overflowed {
                1
            } else {
                inner.keys.len()
            },
            Ordering::Release,
        );
    }

    /// The server was flushed, or restarted empty: nothing on it is stale.
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.keys = HashSet::new();
        inner.overflowed = false;
        self.count.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_confirms_and_overflows() {
        let m = MissedKeys::new(2);
        assert!(!m.contains(b"a"));
        m.record(b"a");
        assert!(m.contains(b"a"));
        assert!(!m.contains(b"b"));
        let batch = m.peek_batch(10);
        assert!(m.contains(b"a"), "still missed until confirmed");
        m.confirm(&batch);
        assert!(!m.contains(b"a"));
        assert!(m.is_empty());
        m.record(b"a");
        m.record(b"b");
        m.record(b"c");
        assert!(m.is_overflowed());
        assert!(
            m.contains(b"zzz"),
            "an overflowed server is stale for every key"
        );
        m.clear();
        assert!(!m.contains(b"zzz"));
    }
}
