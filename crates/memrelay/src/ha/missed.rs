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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::settle::{Held, Look};

pub(crate) struct MissedKeys {
    /// What the set is for, in its log lines.
    label: &'static str,
    /// The server whose keys it lists (empty for sets of other uses), for
    /// the per-key trace lines that follow one key through a failure.
    server: String,
    /// Number of keys recorded, or 1 while overflowed; 0 means "nothing
    /// missed" and lets readers skip the lock.
    count: AtomicUsize,
    inner: Mutex<Inner>,
    cap: usize,
    /// Keys ever recorded (for `stats`).
    pub recorded: AtomicU64,
    /// Moves at every record, of one key or of all (see `epoch`).
    epoch: AtomicU64,
    /// Keys deleted on the server after it came back (for `stats`).
    pub invalidated: AtomicU64,
    /// Whole-server flushes because the set overflowed (for `stats`).
    pub flushes: AtomicU64,
    /// Signalled at every record, so the prober of an up server invalidates
    /// at once instead of at its next pass (while a key is listed, the
    /// server does not serve it, and with its other replica down nothing
    /// does).
    pub recorded_signal: tokio::sync::Notify,
    /// Called when the set stops being empty, when it first holds a
    /// record of this process's own, and when it first holds one no peer
    /// took (outside the lock), with whether a crash would lose what it
    /// holds (`alone`): the state file marks the server as holding stale
    /// copies (`ha::persist`) before the write that missed it is
    /// acknowledged.
    on_dirty: std::sync::OnceLock<Box<dyn Fn(bool) + Send + Sync>>,
    /// Called with every record (`None`: every key) and where it came
    /// from, outside the lock, before the record returns: during a
    /// hand-off the other process is told, and in a fleet the peers are,
    /// before the write that went past the server is answered. Installed
    /// at start (or when a reload adds the server), read at each record:
    /// records are rare, the lock uncontended.
    on_record: std::sync::RwLock<Vec<RecordHook>>,
    /// Called with the keys the prober deleted on the server and forgot:
    /// during a hand-off the old process, which deletes nothing, is told.
    on_clear: std::sync::RwLock<Vec<ClearHook>>,
    /// Records learnt from the other process of a hand-off over its
    /// record socket, in the order it sent them (see `forget_if_covered`).
    streamed: AtomicU64,
    /// Every key counts as missed, while the records keep being kept one
    /// by one: after a crash, until the fleet says again what this
    /// process knew of the server (`hold_unvouched`).
    unvouched: std::sync::atomic::AtomicBool,
}

/// See `MissedKeys::on_clear`: the keys, and `streamed_count` when
/// they were confirmed.
pub(crate) type ClearHook = Box<dyn Fn(&[Box<[u8]>], u64) + Send + Sync>;

/// A record as text, for another memrelay (the hand-off's other process,
/// a peer of the fleet): `<server> <key in base64, or *>`, appended to
/// `out` without a line end.
pub(crate) fn write_record(out: &mut Vec<u8>, server: &str, key: Option<&[u8]>) {
    out.extend_from_slice(server.as_bytes());
    out.push(b' ');
    match key {
        Some(k) => memrelay_protocol::base64::encode(k, out),
        None => out.push(b'*'),
    }
}

/// A record read back: the server's name and the key (`None`: every key);
/// `None` if the text is not a record.
pub(crate) fn read_record(text: &str) -> Option<(&str, Option<Vec<u8>>)> {
    let (server, key) = text.rsplit_once(' ')?;
    if server.is_empty() {
        return None;
    }
    match key {
        "*" => Some((server, None)),
        k => Some((
            server,
            Some(memrelay_protocol::base64::decode(k.as_bytes())?),
        )),
    }
}

/// Told of every record: the key, or None for every key, its source, and
/// its generation (0 when it has none: every key, or an overflowed set).
/// And whether the record is of a write given up on after it was written
/// to the server (`record_failed`): it may still land there.
pub(crate) type RecordHook = Box<dyn Fn(Option<&[u8]>, Source, u64, bool) + Send + Sync>;

/// Who first knew that the server missed a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// A write of this process went past the server.
    Here,
    /// The other memrelay of a hand-off recorded it.
    Handoff,
    /// A peer of the fleet recorded it.
    Peer,
}

impl std::fmt::Debug for MissedKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MissedKeys")
            .field("label", &self.label)
            .field("count", &self.count)
            .field("cap", &self.cap)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Each key with the generation of its latest record, shifted left by
    /// one, and [`OWN`] set if any record of it was this process's own.
    keys: HashMap<Box<[u8]>, u64>,
    /// Keys whose latest record was told to the other process of a
    /// hand-off: that generation, and its number among the records of
    /// this server sent there (see `forget_if_covered`). Only ever filled
    /// during a hand-off, and never beyond `keys`.
    relayed: HashMap<Box<[u8]>, (u64, u64)>,
    /// Keys whose own record (this process's, or its hand-off partner's)
    /// no peer of the fleet has taken yet, with that record's generation,
    /// and whether no peer will: no hint of it was sent (the partner's
    /// records, those loaded from a file), or none was taken (see
    /// `untaken`). Never beyond `keys`; kept only in a fleet
    /// (`track_shares`), so a single memrelay pays nothing for it.
    unshared: HashMap<Box<[u8]>, Unshared>,
    /// Entries of `unshared` no peer will take.
    untaken: usize,
    /// Keys a peer recorded while a write it gave up on may still reach
    /// the server: not deleted for good before they ripen (see
    /// `settle::Held`). Never beyond `keys`; empty outside a fleet.
    held: HashMap<Box<[u8]>, Held>,
    tracks_shares: bool,
    /// Source of generations.
    next_gen: u64,
    /// Keys with [`OWN`] set.
    own: usize,
    overflowed: bool,
    /// Where the record that made it overflow came from.
    overflowed_by: Option<Source>,
    /// While overflowed: some of what it covers was this process's own.
    own_overflow: bool,
}

/// An own record no peer of the fleet has taken yet.
#[derive(Debug, Clone, Copy)]
struct Unshared {
    gen: u64,
    /// No peer will take it: its hint was never sent, or no peer took
    /// one. Stays set when the key is recorded again, until a peer takes
    /// a later hint of it (which covers the key whole).
    untaken: bool,
}

/// The bit of a key's generation saying that this process recorded it
/// (or its hand-off partner did), rather than only a peer of the fleet.
const OWN: u64 = 1;

/// Whether a record from `from` is this process's own knowledge: after a
/// crash only its own state file can bring it back. What a peer recorded,
/// the peer keeps too, and a restarted member asks the peers again.
fn is_own(from: Source) -> bool {
    from != Source::Peer
}

impl Inner {
    fn has_own(&self) -> bool {
        self.own > 0 || (self.overflowed && self.own_overflow)
    }

    fn forget(&mut self, gen: u64) {
        if gen & OWN != 0 {
            self.own -= 1;
        }
    }

    /// Whether a crash of this process would take knowledge with it: an
    /// own record that no peer of the fleet holds or is being asked to
    /// take (every own record, outside a fleet).
    fn alone(&self) -> bool {
        if self.tracks_shares {
            self.untaken > 0 || (self.overflowed && self.own_overflow)
        } else {
            self.has_own()
        }
    }

    /// `key`'s own record `gen` waits for a peer to take it; `untaken`:
    /// no peer will.
    fn unshared(&mut self, key: &[u8], gen: u64, untaken: bool) {
        let u = self.unshared.entry(key.into()).or_insert(Unshared {
            gen,
            untaken: false,
        });
        u.gen = gen;
        if untaken && !u.untaken {
            u.untaken = true;
            self.untaken += 1;
        }
    }

    fn drop_unshared(&mut self, key: &[u8]) {
        if self.unshared.remove(key).is_some_and(|u| u.untaken) {
            self.untaken -= 1;
        }
    }

    /// Removes `key`'s record; returns its generation.
    fn remove(&mut self, key: &[u8]) -> Option<u64> {
        let gen = self.keys.remove(key)?;
        self.relayed.remove(key);
        self.held.remove(key);
        self.drop_unshared(key);
        self.forget(gen);
        Some(gen)
    }

    /// Forgets every key (a flush, an overflow).
    fn drop_keys(&mut self) {
        self.keys = HashMap::new();
        self.relayed = HashMap::new();
        self.held = HashMap::new();
        self.unshared = HashMap::new();
        self.untaken = 0;
        self.own = 0;
    }
}

impl MissedKeys {
    pub(crate) fn new(cap: usize) -> MissedKeys {
        MissedKeys::labelled("missed-key list", cap)
    }

    /// The missed-key list of `server`.
    pub(crate) fn of_server(server: &str, cap: usize) -> MissedKeys {
        MissedKeys {
            server: server.to_string(),
            ..MissedKeys::new(cap)
        }
    }

    /// A set of keys for another purpose (keys being copied by a resync,
    /// keys written during one), with the same bounds.
    pub(crate) fn labelled(label: &'static str, cap: usize) -> MissedKeys {
        MissedKeys {
            label,
            server: String::new(),
            count: AtomicUsize::new(0),
            inner: Mutex::new(Inner::default()),
            cap: cap.max(1),
            recorded: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            invalidated: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            recorded_signal: tokio::sync::Notify::new(),
            on_dirty: std::sync::OnceLock::new(),
            on_record: std::sync::RwLock::new(Vec::new()),
            on_clear: std::sync::RwLock::new(Vec::new()),
            streamed: AtomicU64::new(0),
            unvouched: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Adds a hook called with every record.
    pub(crate) fn on_record(&self, hook: RecordHook) {
        self.on_record
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(hook);
    }

    fn recorded_hook(&self, key: Option<&[u8]>, from: Source, gen: u64, given_up: bool) {
        for hook in self
            .on_record
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            hook(key, from, gen, given_up);
        }
    }

    /// Adds a hook called with the keys deleted on the server and forgot.
    pub(crate) fn on_clear(&self, hook: ClearHook) {
        self.on_clear
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(hook);
    }

    /// The prober deleted `keys` on the server and forgot them; `seen`
    /// is `streamed_count` taken before they were confirmed.
    pub(crate) fn cleared(&self, keys: &[Box<[u8]>], seen: u64) {
        if keys.is_empty() {
            return;
        }
        for hook in self
            .on_clear
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            hook(keys, seen);
        }
    }

    /// Counts a record learnt from the hand-off's record socket. Called
    /// once it is in the set, never before: a count taken meanwhile then
    /// only errs low.
    pub(crate) fn streamed(&self) {
        self.streamed.fetch_add(1, Ordering::SeqCst);
    }

    /// Records learnt from the hand-off's record socket so far.
    pub(crate) fn streamed_count(&self) -> u64 {
        self.streamed.load(Ordering::SeqCst)
    }

    /// Installs the hook called when the set stops being empty or first
    /// holds a record of this process's own (once).
    pub(crate) fn on_dirty(&self, hook: Box<dyn Fn(bool) + Send + Sync>) {
        let _ = self.on_dirty.set(hook);
    }

    fn dirtied(&self) {
        if let Some(hook) = self.on_dirty.get() {
            hook(self.alone());
        }
    }

    /// Whether any key is listed because of this process's own records (or
    /// its hand-off partner's), not only because a peer recorded it.
    pub(crate) fn has_own(&self) -> bool {
        !self.is_empty() && self.lock().has_own()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the set inconsistent
        // in a way that matters (worst case: a key is missing and a stale
        // read is possible), so poisoning is ignored rather than spread.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the server may hold a stale copy of `key`.
    #[inline]
    pub(crate) fn contains(&self, key: &[u8]) -> bool {
        if self.count.load(Ordering::Acquire) == 0 {
            return self.is_unvouched();
        }
        let inner = self.lock();
        inner.overflowed || self.is_unvouched() || inner.keys.contains_key(key)
    }

    /// After a crash, while the fleet has not yet said again what this
    /// process knew of the server (`ha::persist`, `learnt`): every key
    /// counts as missed, so the server serves none, and what is recorded
    /// meanwhile (the peers' lists as they are reached, new records) is
    /// kept key by key, as usual. Then `vouched` lets the server serve by
    /// its list; or, if the fleet never vouches, the caller overflows the
    /// list (a flush) before it calls `vouched`.
    pub(crate) fn hold_unvouched(&self) {
        self.unvouched.store(true, Ordering::SeqCst);
    }

    /// Ends `hold_unvouched`.
    pub(crate) fn vouched(&self) {
        self.unvouched.store(false, Ordering::SeqCst);
        // The prober may wait on it for an up server's next round.
        self.recorded_signal.notify_one();
    }

    /// Relaxed: on every request through `contains`; the hold starts
    /// before the process serves, and a late view of its end only keeps
    /// the server out a moment longer.
    pub(crate) fn is_unvouched(&self) -> bool {
        self.unvouched.load(Ordering::Relaxed)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    pub(crate) fn is_overflowed(&self) -> bool {
        !self.is_empty() && self.lock().overflowed
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().keys.len()
    }

    /// A value that changes whenever something is recorded. A read repair
    /// takes it before reading the backup and compares it once its copy
    /// landed: a change means a write went past this server meanwhile, and
    /// the copy may be older than it. (SeqCst on both sides: the order that
    /// matters runs through memcached, not through any lock here.)
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Records that a write for `key` went past this server.
    pub(crate) fn record(&self, key: &[u8]) {
        self.record_failed(key, false);
    }

    /// Records that a write for `key` did not take on this server;
    /// `given_up`: it was written to the server and given up on (it timed
    /// out, or its connection failed), so the server may still apply it
    /// later. The peers of a fleet are told so, and wait for the server
    /// before they delete the key (`settle::Held`).
    pub(crate) fn record_failed(&self, key: &[u8], given_up: bool) {
        let gen = self.note(key, Source::Here, None);
        self.recorded_hook(Some(key), Source::Here, gen, given_up);
    }

    /// Records what another memrelay recorded (`None`: every key). The
    /// hooks are told where it came from, so none sends it back. Returns
    /// the record's generation (0 for every key, or if overflowed).
    pub(crate) fn learn(&self, key: Option<&[u8]>, from: Source) -> u64 {
        let gen = match key {
            Some(k) => self.note(k, from, None),
            None => {
                self.note_all(from);
                0
            }
        };
        self.recorded_hook(key, from, gen, false);
        gen
    }

    /// Records what a peer recorded while a write it gave up on may still
    /// reach the server (`settle::Held`): the key stays listed until it
    /// ripened, whatever deletes are sent meanwhile.
    pub(crate) fn learn_held(&self, key: &[u8]) {
        let gen = self.note(key, Source::Peer, Some(Instant::now()));
        self.recorded_hook(Some(key), Source::Peer, gen, false);
    }

    /// Returns the record's generation (0 if the set is overflowed).
    /// `held`: when a peer's held record was learnt.
    fn note(&self, key: &[u8], from: Source, held: Option<Instant>) -> u64 {
        self.trace("recorded", key, Some(from));
        self.recorded.fetch_add(1, Ordering::Relaxed);
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.recorded_signal.notify_one();
        let was_empty = self.count.load(Ordering::Acquire) == 0;
        let (news, gen) = self.insert(key, from, held);
        if was_empty || news {
            self.dirtied();
        }
        gen
    }

    /// Returns whether this made the set hold an own record for the
    /// first time, or one a crash would lose (see `on_dirty`), and the
    /// key's generation now (0 if overflowed).
    fn insert(&self, key: &[u8], from: Source, held: Option<Instant>) -> (bool, u64) {
        let mut inner = self.lock();
        let (had_own, was_alone) = (inner.has_own(), inner.alone());
        let gen = self.insert_locked(&mut inner, key, from);
        if let Some(learnt) = held.filter(|_| gen != 0) {
            // A later held record starts the wait again: it may be of
            // another write on its way.
            inner.held.insert(key.into(), Held::new(learnt));
        }
        let news = is_own(from) && !had_own || inner.alone() && !was_alone;
        (news, gen)
    }

    fn insert_locked(&self, inner: &mut Inner, key: &[u8], from: Source) -> u64 {
        let had_own = inner.has_own();
        let own = is_own(from);
        if inner.overflowed {
            inner.own_overflow |= own;
            return 0;
        }
        inner.next_gen += 1;
        let gen = inner.next_gen << 1 | u64::from(own);
        if let Some(g) = inner.keys.get_mut(key) {
            // Recorded again: an invalidation already under way for the
            // older record must not clear this one (see `confirm`).
            let was_own = *g & OWN != 0;
            *g = gen | (*g & OWN);
            let now = *g;
            if own && !was_own {
                inner.own += 1;
            }
            if own && inner.tracks_shares {
                inner.unshared(key, now, from != Source::Here);
            }
            return now;
        }
        if inner.keys.len() >= self.cap {
            inner.overflowed = true;
            inner.overflowed_by = Some(from);
            inner.own_overflow = own || had_own;
            inner.drop_keys();
            self.count.store(1, Ordering::Release);
            tracing::warn!(
                cap = self.cap,
                set = self.label,
                "key set overflowed: it now covers every key"
            );
            return 0;
        }
        inner.keys.insert(key.into(), gen);
        if own && inner.tracks_shares {
            inner.unshared(key, gen, from != Source::Here);
        }
        inner.own += usize::from(own);
        self.count.store(inner.keys.len(), Ordering::Release);
        gen
    }

    /// The server missed a write to every key (a `flush_all`): it must be
    /// flushed before it serves again.
    pub(crate) fn record_all(&self) {
        self.note_all(Source::Here);
        self.recorded_hook(None, Source::Here, 0, false);
    }

    fn note_all(&self, from: Source) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let mut inner = self.lock();
        // The first cause stays: a later one adds nothing.
        if !inner.overflowed {
            inner.overflowed_by = Some(from);
        }
        inner.own_overflow = is_own(from) || inner.has_own();
        inner.overflowed = true;
        inner.drop_keys();
        self.count.store(1, Ordering::Release);
        drop(inner);
        self.dirtied();
        self.recorded_signal.notify_one();
    }

    /// What made the set overflow, while it is overflowed.
    pub(crate) fn overflowed_by(&self) -> Option<Source> {
        let inner = self.lock();
        if inner.overflowed {
            inner.overflowed_by
        } else {
            None
        }
    }

    /// Every key recorded (empty when overflowed: see `is_overflowed`),
    /// for the state file.
    pub(crate) fn snapshot(&self) -> Vec<Box<[u8]>> {
        self.lock().keys.keys().cloned().collect()
    }

    /// The keys recorded after `mark` (and not cleared since): what a
    /// peer sent the lists as they stood at `mark` lacks.
    pub(crate) fn snapshot_since(&self, mark: u64) -> Vec<Box<[u8]>> {
        self.lock()
            .keys
            .iter()
            .filter(|(_, &gen)| gen >> 1 > mark)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The keys whose latest record the other process of a hand-off may
    /// not have: made after `mark` (the lists as handed over) and neither
    /// told to it nor learnt from it (see `note_relayed`). What it has, it
    /// may have deleted on the server since, and a later write may have
    /// put the key's only copy there: giving it back would delete that.
    pub(crate) fn snapshot_untold(&self, mark: u64) -> Vec<Box<[u8]>> {
        let inner = self.lock();
        inner
            .keys
            .iter()
            .filter(|(k, &gen)| {
                gen >> 1 > mark && !matches!(inner.relayed.get(*k), Some(&(g, _)) if g == gen)
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Publishes how many keys `inner` holds (1 while overflowed) for the
    /// lock-free `contains`/`is_empty`, after keys were removed.
    fn publish_count(&self, inner: &Inner) {
        let n = if inner.overflowed {
            1
        } else {
            inner.keys.len()
        };
        self.count.store(n, Ordering::Release);
    }

    /// A mark of the records made so far, for `forget_if_covered`.
    pub(crate) fn mark(&self) -> u64 {
        self.lock().next_gen
    }

    /// A peer of the fleet took the hint of `key`'s own record with
    /// generation `gen` (as the record hooks were told).
    pub(crate) fn shared(&self, key: &[u8], gen: u64) {
        let mut inner = self.lock();
        if inner.unshared.get(key).is_some_and(|u| u.gen == gen) {
            inner.drop_unshared(key);
        }
    }

    /// No peer of the fleet took the hint of `key`'s own record `gen`:
    /// only this process knows it, and a crash would lose it, so the
    /// `on_dirty` hook is told (before the write is answered) when this
    /// makes the set hold such a record.
    pub(crate) fn untaken(&self, key: &[u8], gen: u64) {
        let first = {
            let mut inner = self.lock();
            let was_alone = inner.alone();
            match inner.unshared.get(key).copied() {
                Some(u) if u.gen >= gen && !u.untaken => inner.unshared(key, u.gen, true),
                _ => return,
            }
            !was_alone
        };
        if first {
            self.dirtied();
        }
    }

    /// From now on, own records wait in `unshared` until a peer of the
    /// fleet takes them (`shared`). Those listed already (loaded from a
    /// state file, taken from a hand-off) were sent by no hint of this
    /// process: they count as unshared until deleted.
    pub(crate) fn track_shares(&self) {
        let mut inner = self.lock();
        inner.tracks_shares = true;
        let own: Vec<(Box<[u8]>, u64)> = inner
            .keys
            .iter()
            .filter(|(_, g)| *g & OWN != 0)
            .map(|(k, g)| (k.clone(), *g))
            .collect();
        for (k, gen) in own {
            inner.unshared(&k, gen, true);
        }
    }

    /// Whether a crash of this process would take knowledge with it: an
    /// own record no peer holds and none is being asked to take (outside
    /// a fleet: any own record). A record whose hint is on its way does
    /// not count: its write is not answered before the peers are.
    pub(crate) fn alone(&self) -> bool {
        !self.is_empty() && self.lock().alone()
    }

    /// The record of `key` with generation `gen` (as the record hooks
    /// were told) reached the other process of a hand-off as the `seq`th
    /// record of this server sent there, or (`seq` 0) came from it. Kept
    /// only while it is still the key's latest record.
    pub(crate) fn note_relayed(&self, key: &[u8], gen: u64, seq: u64) {
        let mut inner = self.lock();
        if inner.keys.get(key) == Some(&gen) {
            inner.relayed.insert(key.into(), (gen, seq));
        }
    }

    /// The new process of a hand-off deleted `key` on the server, after it
    /// had learnt the first `seen` records of this server sent to it.
    /// Forgets `key` if its latest record is covered by that delete: made
    /// before `mark` was taken (the hand-off, whose lists the new process
    /// had), or sent to it among those `seen`. A record it had not learnt
    /// may be of a write the delete did not cover, and stays.
    pub(crate) fn forget_if_covered(&self, key: &[u8], mark: u64, seen: u64) {
        let mut inner = self.lock();
        let Some(&gen) = inner.keys.get(key) else {
            return;
        };
        let sent_in_time =
            matches!(inner.relayed.get(key), Some(&(g, seq)) if g == gen && seq <= seen);
        if gen >> 1 > mark && !sent_in_time {
            return;
        }
        inner.remove(key);
        self.trace("forgotten: deleted by the new process", key, None);
        self.publish_count(&inner);
    }

    /// One key's record changed (a trace line, for following a key).
    fn trace(&self, what: &str, key: &[u8], from: Option<Source>) {
        if !self.server.is_empty() {
            tracing::trace!(
                server = %self.server,
                key = %String::from_utf8_lossy(key),
                from = ?from,
                "missed key {what}"
            );
        }
    }

    /// Takes up to `n` keys to invalidate. They stay "missed" (readers keep
    /// bypassing the server for them) until `confirm` is called. Held keys
    /// that have not ripened are left out (see `ripen`).
    pub(crate) fn peek_batch(&self, n: usize) -> Vec<(Box<[u8]>, u64)> {
        let inner = self.lock();
        inner
            .keys
            .iter()
            .filter(|(k, _)| !inner.held.contains_key(*k))
            .take(n)
            .map(|(k, &g)| (k.clone(), g))
            .collect()
    }

    /// The keys were deleted on the server: it no longer holds them stale.
    /// Only records made before the batch was taken are removed: a key
    /// recorded again meanwhile (its copy on the server may be newer than
    /// the delete) stays, and is invalidated again.
    pub(crate) fn confirm(&self, keys: &[(Box<[u8]>, u64)]) {
        let mut inner = self.lock();
        for (k, gen) in keys {
            if inner.keys.get(k) == Some(gen) {
                inner.remove(k);
                self.trace("deleted", k, None);
            }
        }
        self.invalidated
            .fetch_add(keys.len() as u64, Ordering::Relaxed);
        self.publish_count(&inner);
    }

    /// Removes keys without counting them as invalidated.
    pub(crate) fn confirm_quietly(&self, keys: &[Box<[u8]>]) {
        let mut inner = self.lock();
        for k in keys {
            if inner.remove(k).is_some() {
                self.trace("removed", k, None);
            }
        }
        self.publish_count(&inner);
    }

    /// Lets held keys that ripened by `now` (`settle::Held`) be deleted,
    /// given the prober's last look at the server. Returns how long until
    /// the next one ripens (zero: at the next look), None if none is held.
    pub(crate) fn ripen(
        &self,
        look: Option<Look>,
        now: Instant,
        period: Duration,
    ) -> Option<Duration> {
        let mut inner = self.lock();
        if inner.held.is_empty() {
            return None;
        }
        let mut next: Option<Duration> = None;
        inner.held.retain(|_, h| match h.ripen(look, now, period) {
            Some(left) => {
                next = Some(next.map_or(left, |n| n.min(left)));
                true
            }
            None => false,
        });
        next
    }

    /// The server was flushed, or restarted empty: nothing on it is stale.
    pub(crate) fn clear(&self) {
        if !self.server.is_empty() {
            tracing::trace!(server = %self.server, "missed keys: all cleared");
        }
        let mut inner = self.lock();
        inner.drop_keys();
        inner.overflowed = false;
        inner.own_overflow = false;
        self.count.store(0, Ordering::Release);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_epoch_moves_at_every_record_of_a_key_or_of_all() {
        let m = MissedKeys::new(2);
        let e0 = m.epoch();
        m.record(b"a");
        let e1 = m.epoch();
        assert_ne!(e0, e1);
        // A flush_all the server missed: a repair taken before it must see
        // it (it used to move only a statistics counter).
        m.record_all();
        assert_ne!(m.epoch(), e1);
    }

    #[test]
    fn a_clear_forgets_only_what_was_recorded_before_the_mark() {
        let m = MissedKeys::new(10);
        m.record(b"before");
        m.record(b"again");
        let mark = m.mark();
        // Recorded again after the mark: a write the delete may not cover.
        m.record(b"again");
        m.record(b"after");
        for k in [&b"before"[..], b"again", b"after", b"never"] {
            m.forget_if_covered(k, mark, 0);
        }
        assert!(!m.contains(b"before"));
        assert!(m.contains(b"again"));
        assert!(m.contains(b"after"));
        assert_eq!(m.len(), 2);
        assert!(!m.is_empty());
        m.forget_if_covered(b"again", m.mark(), 0);
        m.forget_if_covered(b"after", m.mark(), 0);
        assert!(m.is_empty(), "the count follows the keys");
    }

    #[test]
    fn a_clear_forgets_a_later_record_only_if_the_new_process_had_it() {
        let m = MissedKeys::new(10);
        let mark = m.mark();
        let gens = std::sync::Arc::new(Mutex::new(Vec::new()));
        let g = gens.clone();
        m.on_record(Box::new(move |_, _, gen, _| g.lock().unwrap().push(gen)));
        let last = || *gens.lock().unwrap().last().unwrap();
        // After the hand-off: sent to the new process as its 1st record.
        m.record(b"sent");
        m.note_relayed(b"sent", last(), 1);
        // Not sent yet when the new process deleted it.
        m.record(b"unsent");
        // Sent, then recorded again (a later write missed): not sent yet.
        m.record(b"again");
        m.note_relayed(b"again", last(), 2);
        m.record(b"again");
        // Sent as the 3rd: after what the new process had learnt.
        m.record(b"late");
        m.note_relayed(b"late", last(), 3);
        for k in [&b"sent"[..], b"unsent", b"again", b"late"] {
            m.forget_if_covered(k, mark, 2);
        }
        assert!(!m.contains(b"sent"));
        assert!(m.contains(b"unsent"));
        assert!(m.contains(b"again"), "its latest record was not sent");
        assert!(m.contains(b"late"));
        m.forget_if_covered(b"late", mark, 3);
        assert!(!m.contains(b"late"));
        // A generation that is not the key's latest is not kept.
        m.note_relayed(b"unsent", 12345, 4);
        m.forget_if_covered(b"unsent", mark, 9);
        assert!(m.contains(b"unsent"));
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn the_hand_off_file_lists_only_what_the_new_process_may_lack() {
        let m = MissedKeys::new(10);
        m.record(b"before");
        let mark = m.mark();
        let sent = m.learn(Some(b"sent"), Source::Here);
        m.note_relayed(b"sent", sent, 1);
        let theirs = m.learn(Some(b"theirs"), Source::Handoff);
        m.note_relayed(b"theirs", theirs, 0);
        m.learn(Some(b"unsent"), Source::Here);
        // Sent, then recorded again: the later record was not sent.
        let again = m.learn(Some(b"again"), Source::Here);
        m.note_relayed(b"again", again, 2);
        m.record(b"again");
        let mut untold = m.snapshot_untold(mark);
        untold.sort();
        assert_eq!(
            untold,
            [Box::from(&b"again"[..]), Box::from(&b"unsent"[..])]
        );
    }

    #[test]
    fn only_own_records_no_peer_took_are_this_process_s_alone() {
        let m = MissedKeys::new(10);
        let alone_at = std::sync::Arc::new(Mutex::new(Vec::new()));
        let seen = alone_at.clone();
        m.on_dirty(Box::new(move |alone| seen.lock().unwrap().push(alone)));
        // Listed before the fleet tracks shares (a state file's keys): no
        // hint of this process carried it.
        m.record(b"loaded");
        m.track_shares();
        assert!(m.alone());
        m.confirm(&m.peek_batch(10));
        let gens = std::sync::Arc::new(Mutex::new(Vec::new()));
        let g = gens.clone();
        m.on_record(Box::new(move |_, _, gen, _| g.lock().unwrap().push(gen)));
        let last = || *gens.lock().unwrap().last().unwrap();
        assert!(!m.alone(), "nothing listed");
        m.learn(Some(b"peer's"), Source::Peer);
        assert!(!m.alone(), "a peer's record is the peer's");
        // Its hint is on its way, and its write waits for it.
        m.record(b"a");
        let first = last();
        assert!(!m.alone());
        assert_eq!(*alone_at.lock().unwrap(), vec![true, false, false]);
        m.untaken(b"a", first);
        assert!(m.alone(), "no peer took it");
        assert_eq!(alone_at.lock().unwrap().last(), Some(&true), "told at once");
        // Recorded again: still alone until a peer takes the new hint.
        m.record(b"a");
        let second = last();
        m.shared(b"a", first);
        assert!(m.alone());
        m.shared(b"a", second);
        assert!(!m.alone());
        // A hint taken for an older record does not cover a later one.
        m.record(b"b");
        let b1 = last();
        m.record(b"b");
        m.shared(b"b", b1);
        m.untaken(b"b", last());
        assert!(m.alone());
        m.confirm(&m.peek_batch(10));
        assert!(!m.alone());
        // A record the hand-off partner made is own, and this process
        // sends no hint of it (`fleet::watch`): no peer will take it.
        m.learn(Some(b"partner's"), Source::Handoff);
        assert!(m.alone());
        // Gone from the list (deleted on the server): nothing to lose.
        m.confirm(&m.peek_batch(10));
        assert!(!m.alone());
        // Outside a fleet, every own record is this process's alone.
        let single = MissedKeys::new(10);
        single.record(b"k");
        assert!(single.alone());
    }

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
        // Recorded again while its invalidation was under way: it stays.
        m.record(b"a");
        let batch = m.peek_batch(10);
        m.record(b"a");
        m.confirm(&batch);
        assert!(
            m.contains(b"a"),
            "a newer record survives an older confirmation"
        );
        let batch = m.peek_batch(10);
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

    #[test]
    fn it_knows_whether_it_holds_a_record_of_its_own() {
        let m = MissedKeys::new(3);
        let marks = std::sync::Arc::new(Mutex::new(Vec::new()));
        let seen = marks.clone();
        m.on_dirty(Box::new(move |own| seen.lock().unwrap().push(own)));
        m.learn(Some(b"p"), Source::Peer);
        assert!(!m.has_own());
        // Learnt again, then recorded here: own from then on.
        m.learn(Some(b"p"), Source::Peer);
        m.record(b"p");
        assert!(m.has_own());
        m.learn(Some(b"p"), Source::Peer);
        assert!(m.has_own(), "a peer's record does not take it back");
        assert_eq!(*marks.lock().unwrap(), vec![false, true]);
        let batch = m.peek_batch(10);
        m.confirm(&batch);
        assert!(m.is_empty() && !m.has_own());
        // A handed-off record is own too; a quiet removal forgets it.
        m.learn(Some(b"h"), Source::Handoff);
        m.learn(Some(b"q"), Source::Peer);
        assert!(m.has_own());
        m.confirm_quietly(&[b"h".to_vec().into_boxed_slice()]);
        assert!(!m.has_own() && !m.is_empty());
        // Overflowed by peers' records alone: not own, until one of its
        // own comes (covered by the overflow, and remembered).
        m.learn(Some(b"r"), Source::Peer);
        m.learn(Some(b"s"), Source::Peer);
        m.learn(Some(b"t"), Source::Peer);
        assert!(m.is_overflowed() && !m.has_own());
        m.record(b"u");
        assert!(m.has_own());
        m.clear();
        assert!(!m.has_own());
        // Overflowing while holding an own key keeps it own.
        m.record(b"a");
        m.learn(Some(b"b"), Source::Peer);
        m.learn(Some(b"c"), Source::Peer);
        m.learn(Some(b"d"), Source::Peer);
        assert!(m.is_overflowed() && m.has_own());
        m.clear();
        m.learn(None, Source::Peer);
        assert!(!m.has_own());
    }

    #[test]
    fn a_list_held_for_the_fleet_s_word_serves_nothing_and_keeps_its_records() {
        let m = MissedKeys::of_server("s", 8);
        m.hold_unvouched();
        assert!(m.contains(b"any"), "held: every key counts as missed");
        assert!(m.is_empty() && !m.is_overflowed());
        m.learn(Some(b"listed"), Source::Peer);
        assert!(m.contains(b"other"));
        m.vouched();
        assert!(m.contains(b"listed"), "kept one by one while held");
        assert!(!m.contains(b"other"));
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn a_held_key_is_not_deleted_before_it_ripens() {
        let m = MissedKeys::new(10);
        m.learn(Some(b"plain"), Source::Peer);
        m.learn_held(b"held");
        let keys = |m: &MissedKeys| -> Vec<Box<[u8]>> {
            m.peek_batch(10).into_iter().map(|(k, _)| k).collect()
        };
        assert_eq!(keys(&m), vec![Box::from(&b"plain"[..])]);
        let p = Duration::from_millis(50);
        // No look since it was learnt: at the next one.
        let now = Instant::now();
        assert_eq!(m.ripen(None, now, p), Some(Duration::ZERO));
        let look = Look {
            asked: now,
            answered: now,
        };
        assert_eq!(m.ripen(Some(look), now, p), Some(p));
        assert!(m.contains(b"held"), "still listed, so not served");
        assert_eq!(keys(&m).len(), 1);
        // A period after the look's answer it may go.
        assert_eq!(m.ripen(Some(look), now + p, p), None);
        assert_eq!(keys(&m).len(), 2);
        // Learnt held again: the wait starts over.
        m.learn_held(b"held");
        assert_eq!(m.ripen(Some(look), now + p, p), Some(Duration::ZERO));
    }

    #[test]
    fn the_hooks_are_told_which_records_are_of_writes_given_up_on() {
        let m = MissedKeys::new(10);
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        m.on_record(Box::new(move |k, _, _, given_up| {
            s.lock().unwrap().push((k.map(<[u8]>::to_vec), given_up));
        }));
        m.record(b"skipped");
        m.record_failed(b"timed out", true);
        m.record_failed(b"refused", false);
        m.learn_held(b"peer's");
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                (Some(b"skipped".to_vec()), false),
                (Some(b"timed out".to_vec()), true),
                (Some(b"refused".to_vec()), false),
                // What a peer recorded is not told on.
                (Some(b"peer's".to_vec()), false),
            ]
        );
    }
}
