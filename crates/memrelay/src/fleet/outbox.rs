//! A worker thread's hints on their way to the peers.
//!
//! A worker keeps the hints its requests make ([`keep`]) and hands them
//! over in one batch before it next writes to a client ([`flush_hints`]).
//! A thread of its own (one per worker) sends each batch to every peer
//! reached, waits for their answers, and says how far it got
//! ([`hints_answered`]). The worker does not wait: a reply whose request
//! made hints is held until its hints are answered (the session asks,
//! `proxy::session`), and the worker's other clients are served
//! meanwhile. So a peer that is slow, cut off or being dialled again
//! delays only the replies that depend on it, by at most
//! `--peer-timeout` (plus a redial's), never the worker.
//!
//! Each hint a worker keeps is numbered; a request's hints are the
//! numbers made while it was stepped ([`hints_made`]), and
//! [`confirmed`] tells whether the fleet took them as `--peer-confirm`
//! requires.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::{Fleet, Share};
use crate::stats::fleet::FleetFigures;

thread_local! {
    /// A worker thread's hints not handed over yet (`None` on other
    /// threads, which send each at once).
    static DEFERRED: RefCell<Option<Batch>> = const { RefCell::new(None) };
    /// Whether `DEFERRED` holds any: the one load `flush_hints` costs
    /// while there is nothing to send.
    static PENDING: Cell<bool> = const { Cell::new(false) };
    /// Hints this worker thread kept so far: the number of the last one.
    static MADE: Cell<u64> = const { Cell::new(0) };
    /// This worker thread's batches on their way (made at its first).
    static OUTBOX: RefCell<Option<Arc<Outbox>>> = const { RefCell::new(None) };
}

/// Hints a worker keeps at most before it hands them over without
/// waiting for a client write.
const MAX_KEPT: usize = 1024;

/// This thread (a worker) keeps its hints until [`flush_hints`].
pub(crate) fn defer_hints_on_this_thread() {
    DEFERRED.with(|d| *d.borrow_mut() = Some(Batch::default()));
}

/// The number of the last hint this thread kept: read before and after a
/// request is stepped, the two give the request's hints (none if equal).
#[inline]
pub(crate) fn hints_made() -> u64 {
    MADE.get()
}

/// The number of this thread's last hint whose batch the peers answered
/// (or that `--peer-timeout` gave up on): a reply whose hints are all
/// at or below it may leave.
#[inline]
pub(crate) fn hints_answered() -> u64 {
    OUTBOX.with(|o| {
        o.borrow()
            .as_ref()
            .map_or(0, |o| o.answered.load(Ordering::Acquire))
    })
}

/// Keeps `line` (one hint of `fleet`'s, of the record `share`) for this
/// thread's next [`flush_hints`]; gives `share` back on a thread that does
/// not defer (the caller sends it at once).
pub(super) fn keep(
    fleet: &Arc<Fleet>,
    line: &[u8],
    share: Option<Share>,
) -> Result<(), Option<Share>> {
    let kept = DEFERRED.with(|d| {
        let mut d = d.borrow_mut();
        let Some(d) = d.as_mut() else {
            return Err(share);
        };
        let made = MADE.get() + 1;
        MADE.set(made);
        d.push(fleet, line, made, share);
        Ok(d.count)
    });
    match kept {
        Err(share) => return Err(share),
        // Bounded: many writes finished with no client write after them
        // (their clients left) are handed over now, not kept.
        Ok(n) if n >= MAX_KEPT => {
            PENDING.set(true);
            flush_hints();
        }
        Ok(_) => PENDING.set(true),
    }
    Ok(())
}

/// Hands the hints this thread kept to its sender thread. Called before
/// every write to a client, and by a session whose next reply waits for
/// them; it does not wait for the peers.
#[inline]
pub(crate) fn flush_hints() {
    if !PENDING.get() {
        return;
    }
    PENDING.set(false);
    let kept = DEFERRED.with(|d| d.borrow_mut().as_mut().map(std::mem::take));
    if let Some(batch) = kept.filter(|b| b.count > 0) {
        OUTBOX.with(|o| {
            o.borrow_mut()
                .get_or_insert_with(Outbox::start)
                .hand_over(batch)
        });
    }
}

/// Whether the fleet took hints `first..=last` of this thread as
/// `--peer-confirm` requires (asked once they are answered). A write
/// whose hints were not confirmed must be answered `SERVER_ERROR`: the
/// fleet may not know what it went past.
pub(crate) fn confirmed(first: u64, last: u64) -> bool {
    OUTBOX.with(|o| {
        let o = o.borrow();
        let Some(o) = o.as_ref() else {
            // Never handed over: nobody took them.
            return false;
        };
        let u = lock(&o.refused);
        let refused = u.any(first, last);
        if let Some(f) = u.figures.as_ref().filter(|_| refused) {
            f.writes_refused.fetch_add(1, Ordering::Relaxed);
        }
        !refused
    })
}

/// Wakes the task that waits for this thread's answers (`next`): held by
/// the worker thread's one task that wakes the sessions waiting on them.
pub(crate) struct HintAnswers(Arc<Outbox>);

impl HintAnswers {
    /// This thread's, once it handed hints over.
    pub(crate) fn of_this_thread() -> Option<HintAnswers> {
        OUTBOX.with(|o| o.borrow().clone().map(HintAnswers))
    }

    /// Resolves after the next batch is answered (at once if one was since
    /// the last call).
    pub(crate) async fn next(&self) {
        self.0.wake.notified().await;
    }
}

/// Hints, numbered `first..=last`, as `hint` lines: those a worker keeps
/// until it hands them over, and those handed over and not sent yet
/// (what a worker handed over while its sender was busy is sent as one).
#[derive(Default)]
struct Batch {
    fleet: Option<Arc<Fleet>>,
    lines: Vec<u8>,
    count: usize,
    first: u64,
    last: u64,
    /// The records the hints carry (see `Fleet::send`).
    shares: Vec<Share>,
}

impl Batch {
    /// Adds hint number `n`, `line`, of `fleet`'s (of record `share`).
    fn push(&mut self, fleet: &Arc<Fleet>, line: &[u8], n: u64, share: Option<Share>) {
        self.fleet.get_or_insert_with(|| fleet.clone());
        self.lines.extend_from_slice(line);
        self.shares.extend(share);
        if self.count == 0 {
            self.first = n;
        }
        self.count += 1;
        self.last = n;
    }

    /// Adds `later`'s hints after these.
    fn append(&mut self, later: Batch) {
        if self.count == 0 {
            self.first = later.first;
            self.fleet = later.fleet;
        }
        self.lines.extend_from_slice(&later.lines);
        self.shares.extend(later.shares);
        self.count += later.count;
        self.last = later.last;
    }
}

/// One worker thread's hints between the worker and its sender thread.
/// The queue is bounded by what the worker's clients wait for: each
/// request whose hints are queued holds its reply (and its client's
/// pipeline) until they are answered.
struct Outbox {
    queue: Mutex<Batch>,
    queued: Condvar,
    /// The number of the last hint of the last batch answered.
    answered: AtomicU64,
    /// Batches too few peers took (`--peer-confirm`).
    refused: Mutex<Unconfirmed>,
    wake: tokio::sync::Notify,
    /// No sender thread could be started: the worker sends each batch
    /// itself, waiting for the peers, as it would rather than never.
    inline: std::sync::atomic::AtomicBool,
}

/// How long an idle sender waits before it looks whether its worker is
/// gone.
const IDLE: Duration = Duration::from_secs(1);

impl Outbox {
    fn start() -> Arc<Outbox> {
        let outbox = Arc::new(Outbox {
            queue: Mutex::new(Batch::default()),
            queued: Condvar::new(),
            answered: AtomicU64::new(0),
            refused: Mutex::new(Unconfirmed::default()),
            wake: tokio::sync::Notify::new(),
            inline: std::sync::atomic::AtomicBool::new(false),
        });
        let o = outbox.clone();
        let spawned = std::thread::Builder::new()
            .name("memrelay-hints".into())
            .spawn(move || send_batches(&o));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "fleet: cannot start a worker's hint sender: that worker sends its hints itself, and its clients wait for the peers");
            outbox.inline.store(true, Ordering::Relaxed);
        }
        outbox
    }

    fn hand_over(&self, batch: Batch) {
        if self.inline.load(Ordering::Relaxed) {
            return self.send(batch);
        }
        lock(&self.queue).append(batch);
        self.queued.notify_one();
    }

    /// Sends `batch` to every peer reached, waits for their answers, and
    /// says it was answered.
    fn send(&self, batch: Batch) {
        if let Some(fleet) = batch.fleet {
            if !fleet.send(&batch.lines, batch.count, &batch.shares) {
                let mut u = lock(&self.refused);
                u.figures.get_or_insert_with(|| fleet.figures.clone());
                u.push(batch.first, batch.last);
            }
        }
        self.answered.store(batch.last, Ordering::Release);
        self.wake.notify_one();
    }
}

/// The sender thread: each batch to every peer reached, in order, until
/// the worker thread is gone.
fn send_batches(outbox: &Arc<Outbox>) {
    loop {
        let batch = {
            let mut q = lock(&outbox.queue);
            loop {
                if q.count > 0 {
                    break std::mem::take(&mut *q);
                }
                if Arc::strong_count(outbox) == 1 {
                    return;
                }
                q = outbox
                    .queued
                    .wait_timeout(q, IDLE)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        };
        outbox.send(batch);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Batches of hints too few peers took, kept so the requests that made
/// them can be answered `SERVER_ERROR` (at most `MAX_UNCONFIRMED`: a
/// request whose hints are older than those kept is treated as
/// unconfirmed, never as confirmed).
#[derive(Default)]
struct Unconfirmed {
    batches: VecDeque<(u64, u64)>,
    forgot_through: u64,
    /// Where refused writes are counted (set with the first batch).
    figures: Option<Arc<FleetFigures>>,
}

const MAX_UNCONFIRMED: usize = 256;

impl Unconfirmed {
    fn push(&mut self, first: u64, last: u64) {
        if self.batches.len() == MAX_UNCONFIRMED {
            if let Some((_, l)) = self.batches.pop_front() {
                self.forgot_through = self.forgot_through.max(l);
            }
        }
        self.batches.push_back((first, last));
    }

    /// Whether any of hints `first..=last` is in a batch too few took.
    fn any(&self, first: u64, last: u64) -> bool {
        first <= self.forgot_through || self.batches.iter().any(|&(f, l)| f <= last && first <= l)
    }
}
