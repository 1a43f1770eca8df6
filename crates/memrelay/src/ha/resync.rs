//! Warming a server back from its replicas, in the background.
//!
//! When the prober sees a primary restart (its pid or boot time changed),
//! or an operator asks (`memrelay resync <host:port>`), this copies back
//! the items that belong on that server:
//!
//! 1. list the keys of every server of the other tier (backups for a
//!    primary, primaries for a backup) with `lru_crawler metadump hash`,
//!    keeping those whose replica is the target;
//! 2. for each, in pipelined batches: `mg <key> v f t` on the source, then
//!    `ms <key> <len> F<flags> T<ttl> ME` on the target. Mode E is "add": a
//!    value written by a client meanwhile always wins, and repeating a copy
//!    is harmless, so a failed run simply starts over, and several memrelay
//!    processes resyncing the same server at once only waste work;
//! 3. at most `rate` items per second, so client traffic is not disturbed;
//!    one resync per server at a time; progress in `stats`
//!    (`server:N:resync_*`) and in the log every few seconds.
//!
//! Memory: the selected keys are kept in one byte arena (no allocation per
//! key), bounded by `MAX_KEYS`.
//!
//! A reload replaces the [`Resync`] (its router picks the keys and their
//! sources): runs under the old one stop at their next batch and are asked
//! for again, so they start over under the new configuration, or end if
//! their server is gone. A copy from a source that is no longer the key's
//! replica could bring back a value a client has since deleted.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::connect::{Dial, ServerStream};
use crate::net::read_some;
use memrelay_protocol::response::{self, MetadumpLine};
use memrelay_protocol::{compose, MetaStatus};
use tokio::sync::{mpsc, watch};

use super::replica::Replica;
use crate::router::Router;

/// Most keys one resync copies (a larger server is copied partly; the log
/// says so).
const MAX_KEYS: usize = 20_000_000;
/// Most keys waiting to be copied back to one server after their delete
/// (as many as its missed-key list holds by default).
const MAX_REPAIR_KEYS: usize = 100_000;
/// Keys per pipelined batch.
const BATCH: usize = 200;
/// How often progress is logged.
const LOG_EVERY: Duration = Duration::from_secs(5);
/// Longest a source or target may take to answer a batch.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Why a run stopped early when a reload replaced its configuration.
const CANCELLED: &str = "cancelled by a reload";

/// A resync's progress, per server, for `stats`.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// Where the last run stands.
    state: AtomicState,
    running: AtomicBool,
    /// A run of every key is under way or waiting to start (a run of a
    /// few keys, `Resync::repair`, may hold `running` meanwhile).
    whole: AtomicBool,
    pub runs: AtomicU64,
    pub scanned: AtomicU64,
    pub selected: AtomicU64,
    pub copied: AtomicU64,
    pub skipped: AtomicU64,
    pub errors: AtomicU64,
    /// Items per second over the current or last run.
    pub rate: AtomicU64,
    /// Seconds left, estimated.
    pub eta: AtomicU64,
    /// Keys to copy back by the next run of a few keys (`Resync::repair`),
    /// and whether that run is asked for already.
    repairs: std::sync::Mutex<Repairs>,
}

/// See `Progress::repairs`.
#[derive(Debug, Default)]
struct Repairs {
    keys: Vec<Box<[u8]>>,
    queued: bool,
}

impl Progress {
    /// Whether a resync of this server is under way (one relaxed load: the
    /// write path asks on every write).
    #[inline]
    pub(crate) fn is_running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    /// Adds keys to copy back; true if a run must be started for them
    /// (none is waiting). Past `MAX_REPAIR_KEYS` waiting, keys are left
    /// out (logged): they keep one copy until written again.
    fn queue_repair(&self, server: &str, keys: Vec<Box<[u8]>>) -> bool {
        let mut r = self.repairs.lock().unwrap_or_else(|p| p.into_inner());
        let room = MAX_REPAIR_KEYS.saturating_sub(r.keys.len());
        if keys.len() > room {
            tracing::warn!(server, left_out = keys.len() - room, "too many deleted keys waiting to be copied back: some keep one copy until written again");
        }
        r.keys.extend(keys.into_iter().take(room));
        !std::mem::replace(&mut r.queued, true)
    }

    /// The keys waiting to be copied back; the next ones queued start a
    /// new run.
    fn take_repairs(&self) -> Vec<Box<[u8]>> {
        let mut r = self.repairs.lock().unwrap_or_else(|p| p.into_inner());
        r.queued = false;
        std::mem::take(&mut r.keys)
    }

    pub(crate) fn state(&self) -> &'static str {
        self.state.load().name()
    }
}

/// Where a server's resync stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub(crate) enum RunState {
    /// Never ran, or a reload interrupted it.
    #[default]
    Idle = 0,
    Running = 1,
    Done = 2,
    /// The last run failed; it will start over.
    Retrying = 3,
}

impl RunState {
    /// As `stats` shows it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            RunState::Idle => "idle",
            RunState::Running => "running",
            RunState::Done => "done",
            RunState::Retrying => "retrying",
        }
    }
}

/// A [`RunState`] the resync task writes and `stats` reads from any thread.
#[derive(Debug, Default)]
struct AtomicState(AtomicU8);

impl AtomicState {
    fn load(&self) -> RunState {
        match self.0.load(Ordering::Relaxed) {
            1 => RunState::Running,
            2 => RunState::Done,
            3 => RunState::Retrying,
            _ => RunState::Idle,
        }
    }

    fn store(&self, state: RunState) {
        self.0.store(state as u8, Ordering::Relaxed);
    }
}

/// One server as the resync sees it.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub dial: Dial,
    pub name: String,
    pub health: Arc<Replica>,
}

/// Everything a resync needs under one configuration; shared by the
/// manager and its runs.
#[derive(Debug)]
pub(crate) struct Resync {
    pub router: Router,
    /// Primaries then backups, like `Config::servers`.
    pub nodes: Vec<Node>,
    pub nprimaries: usize,
    pub rate: u64,
    pub connect_timeout: Duration,
    /// Largest value a copy may carry (`--max-value-size`): a bigger one
    /// could not have been written through memrelay, and a server claiming
    /// one must not make the resync buffer it.
    pub max_value_len: usize,
    /// The longest a client write can be in flight (see `write_life`).
    pub write_life: Duration,
    /// A server seen restarting is resynced (`--no-resync` not given, and
    /// there are backups).
    pub automatic: bool,
    /// Set when a reload replaced this configuration.
    cancel: watch::Sender<bool>,
}

/// What of the configuration a resync runs by (see the fields of
/// [`Resync`] of the same names).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub rate: u64,
    pub connect_timeout: Duration,
    pub max_value_len: usize,
    pub write_life: Duration,
    pub automatic: bool,
}

/// The longest a client write can be in flight: an attempt on the primary
/// and one on the backup, then the mirrors, each of which may need a
/// connection and a reply.
pub(crate) fn write_life(connect_timeout: Duration, timeout: Duration) -> Duration {
    (connect_timeout + timeout) * 3
}

/// A request to resync a server, named (indexes change with a reload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    pub server: String,
    /// From the prober, which saw the server restart: honoured only when
    /// resync is automatic. False: an operator asked (`memrelay resync`).
    pub automatic: bool,
    /// Empty: every key of the server. Otherwise only these: keys the
    /// prober just deleted there (`ha::upkeep`), whose value a client
    /// wrote to the other tier alone while the server missed it.
    pub keys: Vec<Box<[u8]>>,
}

impl Request {
    /// A resync of every key of `server`.
    pub(crate) fn whole(server: String, automatic: bool) -> Request {
        Request {
            server,
            automatic,
            keys: Vec::new(),
        }
    }
}

/// Where resync requests go: from the probers and from the admin command
/// on any worker, to the manager ([`serve`]).
pub(crate) type Requests = mpsc::UnboundedSender<Request>;

/// How a resync's runs ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Done,
    /// A reload replaced the configuration it ran under.
    Cancelled,
}

/// The manager: starts a run for every request under the configuration
/// current then, unless one is running for that server already. A run a
/// reload interrupts is asked for again through `again`.
///
/// While `shared` says another memrelay serves the same servers (a
/// hand-off under way, `ha::persist`), no run starts: a run checks its
/// copies against its own process's client writes only, so the other
/// process's delete could be undone by a copy.
pub(crate) async fn serve(
    current: watch::Receiver<Arc<Resync>>,
    mut requests: mpsc::UnboundedReceiver<Request>,
    again: Requests,
    mut shared: Option<watch::Receiver<bool>>,
) {
    while let Some(req) = requests.recv().await {
        if let Some(shared) = shared.as_mut() {
            if *shared.borrow() {
                tracing::info!(server = %req.server, "resync waits until the hand-off's other memrelay is gone");
            }
            // An error: the state file's keeper is gone, and with it the
            // process.
            let _ = shared.wait_for(|&s| !s).await;
        }
        let me = current.borrow().clone();
        if req.automatic && !me.automatic {
            continue;
        }
        let Some(target) = me.nodes.iter().position(|n| n.name == req.server) else {
            tracing::info!(server = %req.server, "not resynced: no longer configured");
            continue;
        };
        if !req.keys.is_empty() {
            let progress = &me.nodes[target].health.resync;
            if progress.queue_repair(&req.server, req.keys) {
                let again = again.clone();
                tokio::task::spawn_local(async move {
                    if let Some(keys) = me.repair(target).await.filter(|k| !k.is_empty()) {
                        // Cancelled by a reload: asked for again under
                        // the new configuration.
                        let _ = again.send(Request {
                            server: req.server,
                            automatic: true,
                            keys,
                        });
                    }
                });
            }
            continue;
        }
        let node = &me.nodes[target];
        if node.health.resync.whole.swap(true, Ordering::AcqRel) {
            tracing::info!(server = %node.name, "resync already running");
            continue;
        }
        let again = again.clone();
        tokio::task::spawn_local(async move {
            let progress = &me.nodes[target].health.resync;
            // After the run of a few keys under way, if any.
            let ended = if me.take_turn(target).await {
                let ended = me.run_until_done(target).await;
                progress.running.store(false, Ordering::Release);
                me.nodes[target].health.touched.clear();
                ended
            } else {
                Ended::Cancelled
            };
            progress.whole.store(false, Ordering::Release);
            if ended == Ended::Cancelled {
                let _ = again.send(req);
            }
        });
    }
}

impl Resync {
    pub(crate) fn new(
        router: Router,
        nodes: Vec<Node>,
        nprimaries: usize,
        settings: Settings,
    ) -> Resync {
        let Settings {
            rate,
            connect_timeout,
            max_value_len,
            write_life,
            automatic,
        } = settings;
        Resync {
            router,
            nodes,
            nprimaries,
            rate,
            connect_timeout,
            max_value_len,
            write_life,
            automatic,
            cancel: watch::channel(false).0,
        }
    }

    /// A reload replaced this configuration: its runs stop at their next
    /// batch (the one under way completes: its copies are guarded like any
    /// other) and are asked for again.
    pub(crate) fn cancel(&self) {
        self.cancel.send_replace(true);
    }

    fn cancelled(&self) -> bool {
        *self.cancel.borrow()
    }

    /// Sleeps for `d`, or less if the run is cancelled meanwhile.
    async fn pause(&self, d: Duration) {
        let mut rx = self.cancel.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = rx.wait_for(|&c| c) => {}
        }
    }

    /// The servers to copy from for `target`, and which tier of a key's
    /// replicas `target` is.
    fn sources(&self, target: usize) -> (Vec<usize>, usize) {
        if target < self.nprimaries {
            // Every backup tier: copies of one key from several are adds
            // of the same item, harmless.
            ((self.nprimaries..self.nodes.len()).collect(), 0)
        } else {
            ((0..self.nprimaries).collect(), self.router.tier_of(target))
        }
    }

    async fn run_until_done(&self, target: usize) -> Ended {
        let node = &self.nodes[target];
        let p = &node.health.resync;
        let mut backoff = Duration::from_secs(1);
        loop {
            // A server that is down cannot take copies, and one waiting to
            // be flushed would lose them: wait for it.
            while node.health.is_down() || node.health.missed.is_overflowed() {
                if self.cancelled() {
                    p.state.store(RunState::Idle);
                    return Ended::Cancelled;
                }
                self.pause(Duration::from_millis(200)).await;
            }
            p.state.store(RunState::Running);
            p.runs.fetch_add(1, Ordering::Relaxed);
            let result = self.run(target).await;
            if self.cancelled() {
                p.state.store(RunState::Idle);
                tracing::info!(server = %node.name, "resync interrupted by a reload");
                return Ended::Cancelled;
            }
            match result {
                Ok(()) => {
                    p.state.store(RunState::Done);
                    tracing::info!(
                        server = %node.name,
                        scanned = p.scanned.load(Ordering::Relaxed),
                        copied = p.copied.load(Ordering::Relaxed),
                        skipped = p.skipped.load(Ordering::Relaxed),
                        "resync finished"
                    );
                    return Ended::Done;
                }
                Err(e) => {
                    p.state.store(RunState::Retrying);
                    p.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(server = %node.name, error = %e, retry_in = ?backoff, "resync failed; it will start over");
                    self.pause(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// Copies the keys queued for `target` back from the other tier, once
    /// no other run of `target` is under way (the runs share `touched`).
    /// The keys were just deleted on `target` after it missed writes of
    /// them: the values written meanwhile live on the other tier only, and
    /// would stay single copies until written again. A failure is logged
    /// and the keys left as they are (one copy, as before the repair).
    /// Returns the keys if a reload or a hand-off cancelled the run, to be
    /// asked for again.
    async fn repair(&self, target: usize) -> Option<Vec<Box<[u8]>>> {
        let node = &self.nodes[target];
        if !self.take_turn(target).await {
            return Some(node.health.resync.take_repairs());
        }
        // Every key queued until now: one wait for the writes in flight
        // serves them all.
        let keys = node.health.resync.take_repairs();
        let result = self.copy_keys(target, &keys).await;
        node.health.resync.running.store(false, Ordering::Release);
        node.health.touched.clear();
        if self.cancelled() {
            // A reload or a hand-off: asked for again, under the new
            // configuration or by the new process. (The copies are adds:
            // making one twice is harmless.)
            return Some(keys);
        }
        match result {
            Ok(copied) => {
                tracing::debug!(server = %node.name, keys = keys.len(), copied, "deleted keys copied back");
            }
            Err(e) => {
                tracing::info!(server = %node.name, keys = keys.len(), error = %e, "deleted keys not copied back: they keep one copy until written again")
            }
        }
        None
    }

    /// Waits until no other run of `target` is under way and claims it
    /// (`running`, which the caller clears): runs of one server share its
    /// note of client writes. False if a reload cancelled this
    /// configuration meanwhile.
    async fn take_turn(&self, target: usize) -> bool {
        let running = &self.nodes[target].health.resync.running;
        while running.swap(true, Ordering::AcqRel) {
            if self.cancelled() {
                return false;
            }
            self.pause(Duration::from_millis(200)).await;
        }
        true
    }

    /// The copying of `repair`: like `run`, with the keys given.
    async fn copy_keys(&self, target: usize, keys: &[Box<[u8]>]) -> Result<u64, String> {
        self.settle_writes(target).await?;
        let (sources, tier) = self.sources(target);
        let mut copied = 0;
        for &source in &sources {
            let src_tier = self.router.tier_of(source);
            let mine: Vec<&[u8]> = keys
                .iter()
                .map(|k| &k[..])
                .filter(|k| {
                    let r = self.router.replicas(k);
                    r.get(tier) == Some(target) && r.get(src_tier) == Some(source)
                })
                .collect();
            if mine.is_empty() {
                continue;
            }
            copied += self
                .copy_batches(source, target, mine.chunks(BATCH), || {})
                .await?;
        }
        Ok(copied)
    }

    /// From now on every client write of a key of `target` is noted in
    /// `touched`. A write already in flight is not, and may not have
    /// reached the source yet (a delete waiting on a stopped primary
    /// before its mirror): a copy read before it lands would undo it. So
    /// this waits until every such write has ended, before anything is
    /// read. A reload that replaces this configuration ends the wait too.
    async fn settle_writes(&self, target: usize) -> Result<(), String> {
        self.nodes[target].health.touched.clear();
        self.pause(self.write_life).await;
        if self.cancelled() {
            return Err(CANCELLED.into());
        }
        Ok(())
    }

    /// Copies `batches` of keys from `source` to `target`, over one
    /// connection to each, at most `--resync-rate` keys a second, counted
    /// in the target's progress; `after_batch` runs after each. Returns
    /// how many copies stand.
    async fn copy_batches<'k, B: AsRef<[&'k [u8]]>>(
        &self,
        source: usize,
        target: usize,
        batches: impl Iterator<Item = B>,
        mut after_batch: impl FnMut(),
    ) -> Result<u64, String> {
        let (src, node) = (&self.nodes[source], &self.nodes[target]);
        let p = &node.health.resync;
        let mut from = connect(&src.dial, self.connect_timeout).await?;
        let mut to = connect(&node.dial, self.connect_timeout).await?;
        let mut copied = 0;
        for batch in batches {
            let batch = batch.as_ref();
            // The router chose this source: after a reload it may no
            // longer, and after a hand-off the other process's client
            // writes are not in `touched`.
            if self.cancelled() {
                return Err(CANCELLED.into());
            }
            let batch_started = Instant::now();
            let n = self
                .copy_batch(src, node, &mut from, &mut to, batch)
                .await?;
            copied += n;
            p.copied.fetch_add(n, Ordering::Relaxed);
            p.skipped
                .fetch_add((batch.len() as u64).saturating_sub(n), Ordering::Relaxed);
            // Rate limit: this batch may take no less than its share.
            let share = Duration::from_secs_f64(batch.len() as f64 / self.rate.max(1) as f64);
            if let Some(wait) = share.checked_sub(batch_started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            after_batch();
        }
        Ok(copied)
    }

    /// One complete pass.
    async fn run(&self, target: usize) -> Result<(), String> {
        let node = &self.nodes[target];
        let p = &node.health.resync;
        for c in [
            &p.scanned,
            &p.selected,
            &p.copied,
            &p.skipped,
            &p.rate,
            &p.eta,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        self.settle_writes(target).await?;
        let (sources, tier) = self.sources(target);
        if sources.is_empty() {
            return Ok(());
        }
        tracing::info!(server = %node.name, sources = sources.len(), rate = self.rate, "resync started");
        let started = Instant::now();
        let mut last_log = Instant::now();
        for &source in &sources {
            if self.cancelled() {
                return Err(CANCELLED.into());
            }
            let keys = self.select_keys(&self.nodes[source], target, tier).await?;
            self.copy_batches(source, target, keys.chunks(BATCH), || {
                self.note_progress(node, started, &mut last_log)
            })
            .await?;
        }
        Ok(())
    }

    /// Copies one batch of keys from `src` to the target `node`: fetched,
    /// left out where the source may not serve them, added, and checked
    /// against the client writes made meanwhile. Returns how many copies
    /// stand.
    async fn copy_batch(
        &self,
        src: &Node,
        node: &Node,
        from: &mut ServerStream,
        to: &mut ServerStream,
        batch: &[&[u8]],
    ) -> Result<u64, String> {
        let mut items = match fetch(from, batch, self.max_value_len).await {
            Ok(items) => items,
            // Nothing was written to the target.
            Err(e) => return Err(e),
        };
        // Copy only what the source may serve: a source marked
        // down, or one that missed a write of a key (its copy may
        // be older than an acknowledged write, or a deleted value),
        // is no source for it. Checked after the read, so a write
        // that went past the source while it was read counts too;
        // one that goes past it later reaches the target and is
        // noted in `touched`, below.
        if src.health.is_down() {
            return Err(format!("source {} is down", src.name));
        }
        items.retain(|i| !src.health.missed.contains(i.key) && !src.health.copying.contains(i.key));
        // From before our adds are sent until each landed copy is
        // checked against client writes (`unstore`), the target
        // does not serve these keys: a copy that undoes a client's
        // delete or append must never be read. Not before the
        // fetch: while a stalled source holds the fetch, the target
        // may be the one replica serving them.
        for k in batch {
            node.health.copying.record(k);
        }
        // A copy that may be older than a client's write is deleted
        // on the target (recorded as missed) before it serves, but
        // only while the source still serves the key: otherwise the
        // target is the one replica left, it may hold writes made
        // there since (the source down, writes fail over to it),
        // and deleting them would lose acknowledged data.
        let invalidate = |k: &[u8]| {
            if src.health.serves(k) {
                node.health.missed.record(k);
            }
        };
        let landed = match store(to, &items, self.max_value_len).await {
            Ok(landed) => landed,
            Err(e) => {
                // Unknown outcome: some adds may have landed.
                for k in batch {
                    invalidate(k);
                }
                settle_copying(&node.health, batch);
                return Err(e);
            }
        };
        // A client wrote these keys during the resync: the copy
        // may be older than the write. The target does not serve
        // them yet (they are in `copying`): delete each copy that
        // no client write has replaced since it landed.
        let (touched, fresh): (Vec<_>, Vec<_>) = landed
            .iter()
            .partition(|(k, _)| node.health.touched.contains(k));
        let n_copied = fresh.len() as u64;
        if let Err(e) = unstore(to, &touched, self.max_value_len).await {
            for (k, _) in &touched {
                invalidate(k);
            }
            settle_copying(&node.health, batch);
            return Err(e);
        }
        settle_copying(&node.health, batch);
        Ok(n_copied)
    }

    /// The run's rate and time left, and a log line every `LOG_EVERY`.
    fn note_progress(&self, node: &Node, started: Instant, last_log: &mut Instant) {
        let p = &node.health.resync;
        let done = p.copied.load(Ordering::Relaxed) + p.skipped.load(Ordering::Relaxed);
        let rate = (done as f64 / started.elapsed().as_secs_f64().max(0.001)) as u64;
        p.rate.store(rate, Ordering::Relaxed);
        let left = p.selected.load(Ordering::Relaxed).saturating_sub(done);
        p.eta.store(left / rate.max(1), Ordering::Relaxed);
        if last_log.elapsed() >= LOG_EVERY {
            *last_log = Instant::now();
            tracing::info!(
                server = %node.name,
                scanned = p.scanned.load(Ordering::Relaxed),
                selected = p.selected.load(Ordering::Relaxed),
                copied = p.copied.load(Ordering::Relaxed),
                skipped = p.skipped.load(Ordering::Relaxed),
                rate,
                eta_s = p.eta.load(Ordering::Relaxed),
                "resync progress"
            );
        }
    }

    /// Lists `src`'s keys and keeps those whose replica at `tier` is `target`.
    async fn select_keys(
        &self,
        src: &Node,
        target: usize,
        tier: usize,
    ) -> Result<KeyArena, String> {
        let p = &self.nodes[target].health.resync;
        let mut conn = connect(&src.dial, self.connect_timeout).await?;
        let mut req = Vec::with_capacity(32);
        compose::metadump_all(&mut req);
        write_timed(&mut conn, &req, &[req.len()]).await?;
        let mut keys = KeyArena::default();
        let mut buf = Vec::with_capacity(64 * 1024);
        let mut chunk = vec![0u8; 64 * 1024];
        let mut decoded = Vec::with_capacity(256);
        loop {
            if self.cancelled() {
                return Err(CANCELLED.into());
            }
            let n = tokio::time::timeout(IO_TIMEOUT, read_some(&conn, &mut chunk))
                .await
                .map_err(|_| format!("{}: metadump timed out", src.name))?
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err(format!("{}: closed during metadump", src.name));
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut consumed = 0;
            while let Some(nl) = buf[consumed..].iter().position(|&b| b == b'\n') {
                let line = &buf[consumed..consumed + nl];
                consumed += nl + 1;
                match response::metadump_line(line, &mut decoded) {
                    MetadumpLine::End => return Ok(keys),
                    MetadumpLine::Refused => {
                        let line = line.strip_suffix(b"\r").unwrap_or(line);
                        return Err(format!(
                            "{}: metadump refused: {}",
                            src.name,
                            String::from_utf8_lossy(line)
                        ));
                    }
                    MetadumpLine::Other => continue,
                    MetadumpLine::Key => {}
                }
                p.scanned.fetch_add(1, Ordering::Relaxed);
                let replicas = self.router.replicas(&decoded);
                if replicas.get(tier) == Some(target) && keys.len() < MAX_KEYS {
                    keys.push(&decoded);
                    p.selected.fetch_add(1, Ordering::Relaxed);
                }
            }
            buf.drain(..consumed);
            if buf.len() > 1 << 20 {
                return Err(format!("{}: metadump line too long", src.name));
            }
        }
    }
}

/// Ends the copy window of a batch.
fn settle_copying(health: &Replica, batch: &[&[u8]]) {
    let keys: Vec<Box<[u8]>> = batch.iter().map(|k| Box::<[u8]>::from(*k)).collect();
    health.copying.confirm_quietly(&keys);
}

/// Keys stored back to back, with their end offsets.
#[derive(Debug, Default)]
struct KeyArena {
    bytes: Vec<u8>,
    ends: Vec<u32>,
}

impl KeyArena {
    fn push(&mut self, key: &[u8]) {
        self.bytes.extend_from_slice(key);
        self.ends.push(self.bytes.len() as u32);
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn chunks(&self, n: usize) -> impl Iterator<Item = Vec<&[u8]>> + '_ {
        self.ends.chunks(n).enumerate().map(move |(c, ends)| {
            let mut start = if c == 0 {
                0
            } else {
                self.ends[c * n - 1] as usize
            };
            ends.iter()
                .map(|&e| {
                    let k = &self.bytes[start..e as usize];
                    start = e as usize;
                    k
                })
                .collect()
        })
    }
}

async fn connect(dial: &Dial, timeout: Duration) -> Result<ServerStream, String> {
    dial.connect(timeout)
        .await
        .map_err(|e| format!("{}: {e}", dial.addr))
}

/// One item read from a source.
struct Item<'a> {
    key: &'a [u8],
    flags: u32,
    ttl: i64,
    value: Vec<u8>,
}

/// `mg <key> v f t` for a batch, pipelined; the keys that are gone (or
/// expiring now) are left out.
async fn fetch<'a>(
    conn: &mut ServerStream,
    keys: &[&'a [u8]],
    max_value: usize,
) -> Result<Vec<Item<'a>>, String> {
    let mut req = Vec::with_capacity(keys.len() * 48);
    let mut ends = Vec::with_capacity(keys.len());
    for k in keys {
        compose::meta_get_item(&mut req, k);
        ends.push(req.len());
    }
    write_timed(conn, &req, &ends).await?;
    let mut reader = Replies::new(max_value);
    let mut items = Vec::with_capacity(keys.len());
    for k in keys {
        let reply = reader.next(conn).await?;
        let mf = memrelay_protocol::meta_flags(&reply);
        let Some((off, len)) = mf.data else { continue };
        let Some(ttl) = super::exptime_from_ttl(mf.ttl) else {
            continue;
        };
        items.push(Item {
            key: k,
            flags: mf.flags.unwrap_or(0),
            ttl,
            value: reply[off..off + len].to_vec(),
        });
    }
    Ok(items)
}

/// `ms <key> <len> F T ME` for a batch, pipelined: (copied, skipped because
/// the target already had a value).
/// Adds the items to the target; returns the keys whose copy landed, with
/// the CAS value memcached gave each copy.
async fn store<'a>(
    conn: &mut ServerStream,
    items: &[Item<'a>],
    max_value: usize,
) -> Result<Vec<(&'a [u8], u64)>, String> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let mut req = Vec::with_capacity(items.iter().map(|i| i.value.len() + 64).sum());
    let mut ends = Vec::with_capacity(items.len());
    for it in items {
        compose::meta_add_copy(&mut req, it.key, &it.value, it.flags, it.ttl);
        ends.push(req.len());
    }
    write_timed(conn, &req, &ends).await?;
    let mut reader = Replies::new(max_value);
    let mut landed = Vec::with_capacity(items.len());
    for it in items {
        let reply = reader.next(conn).await?;
        let status = memrelay_protocol::response::meta_status(&reply);
        if status == Some(MetaStatus::Hd) {
            let cas = memrelay_protocol::meta_flags(&reply).cas.ok_or_else(|| {
                format!(
                    "a copy's reply has no CAS value: {}",
                    String::from_utf8_lossy(&reply)
                )
            })?;
            landed.push((it.key, cas));
        } else if status != Some(MetaStatus::Ns) {
            return Err(format!(
                "unexpected reply to a copy: {}",
                String::from_utf8_lossy(&reply)
            ));
        }
    }
    Ok(landed)
}

/// Deletes copies that may be older than a client's write, each only if it
/// is still exactly the copy (its CAS unchanged): a client write that
/// reached the target since the copy landed (the source down, writes
/// failing over to the target) is kept. Returns how many were deleted.
async fn unstore(
    conn: &mut ServerStream,
    copies: &[(&[u8], u64)],
    max_value: usize,
) -> Result<usize, String> {
    if copies.is_empty() {
        return Ok(0);
    }
    let mut req = Vec::with_capacity(copies.len() * 64);
    let mut ends = Vec::with_capacity(copies.len());
    for (key, cas) in copies {
        compose::meta_delete_if_cas(&mut req, key, *cas);
        ends.push(req.len());
    }
    write_timed(conn, &req, &ends).await?;
    let mut reader = Replies::new(max_value);
    let mut deleted = 0;
    for _ in copies {
        let reply = reader.next(conn).await?;
        match memrelay_protocol::response::meta_status(&reply) {
            Some(MetaStatus::Hd) => deleted += 1,
            Some(MetaStatus::Ex | MetaStatus::Nf) => {}
            _ => {
                return Err(format!(
                    "unexpected reply to a conditional delete: {}",
                    String::from_utf8_lossy(&reply)
                ))
            }
        }
    }
    Ok(deleted)
}

/// Writes pipelined requests (`ends`: where each ends), bounded like the
/// reads: a server that stops reading must not hold the resync task
/// forever.
async fn write_timed(conn: &mut ServerStream, bytes: &[u8], ends: &[usize]) -> Result<(), String> {
    tokio::time::timeout(IO_TIMEOUT, conn.write_requests(bytes, ends))
        .await
        .map_err(|_| "server stopped reading during resync".to_string())?
        .map_err(|e| e.to_string())
}

/// Reads meta replies one by one.
struct Replies {
    buf: Vec<u8>,
    max_value: usize,
}

impl Replies {
    fn new(max_value: usize) -> Replies {
        Replies {
            buf: Vec::new(),
            max_value,
        }
    }

    async fn next(&mut self, conn: &mut ServerStream) -> Result<Vec<u8>, String> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match memrelay_protocol::parse_response(
                &self.buf,
                memrelay_protocol::Expect::Meta,
                self.max_value,
            ) {
                Ok(Some((_, n))) => return Ok(self.buf.drain(..n).collect()),
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            let n = tokio::time::timeout(IO_TIMEOUT, read_some(conn, &mut chunk))
                .await
                .map_err(|_| "server timed out during resync".to_string())?
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("server closed the connection during resync".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_chunks_give_back_every_key() {
        let mut a = KeyArena::default();
        for i in 0..7 {
            a.push(format!("k{i}").as_bytes());
        }
        let all: Vec<Vec<u8>> = a.chunks(3).flatten().map(|k| k.to_vec()).collect();
        assert_eq!(all.len(), 7);
        assert_eq!(all[6], b"k6");
    }
}
