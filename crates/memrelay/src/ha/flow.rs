//! What every step of a request's flow works with, besides its [`Slot`]:
//! the configuration it started under, where its replies go, which request
//! of the session it is, and the request itself.
//!
//! The steps of `ha::read`, `ha::meta_read` and `ha::write` take a `Flow`
//! and the slot they advance. Each keyed request is of a [`Kind`], which
//! [`start`]s it and [`render`]s its reply; in between, [`run`] takes its
//! steps. Each kind is a type of its module (`read::Read`,
//! `meta_read::MetaRead`, `write::Write`) that owns a private stage enum,
//! each stage carrying what only it needs, and has one `advance`: the slot
//! holds it in a [`State`], and `advance` here only picks the kind.

use std::rc::Rc;

use memrelay_protocol::{Command, Request};

use super::slot::Slot;
use super::{meta_read, read, write};
use super::{Cluster, Inbox, Pool};
use crate::backend::{ReplyTo, ServerPool};
use crate::net::outqueue::OutQueue;

/// The kinds of request whose flow the HA layer runs, each by its own
/// steps: [`start`], then [`run`] as its parts come in, then [`render`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `get gets gat gats`: `ha::read`.
    Read,
    /// `mg me`: `ha::meta_read`.
    MetaRead,
    /// Every keyed write, classic and meta: `ha::write`.
    Write,
}

impl Kind {
    /// The kind of a command, if the HA layer runs it (not `flush_all`,
    /// not what the proxy answers itself).
    pub(crate) fn of(command: Command) -> Option<Kind> {
        match command {
            c if c.is_retrieval() => Some(Kind::Read),
            Command::MetaGet | Command::MetaDebug => Some(Kind::MetaRead),
            c if c.is_write() => Some(Kind::Write),
            _ => None,
        }
    }
}

/// Where a slot's flow stands: its kind, with that kind's own state (whose
/// stage only the kind's module sees). The layers above ask the slot
/// (`is_done`, `wants_step`, `copies_unsettled`), never this.
#[derive(Debug)]
pub(crate) enum State {
    /// No step to take: a reply the proxy makes itself (a `get` without
    /// keys too), `flush_all`, `memrelay reload` (done once their parts
    /// are in), or a keyed request its kind has not started yet.
    Done,
    Read(read::Read),
    MetaRead(meta_read::MetaRead),
    Write(write::Write),
}

impl State {
    /// Nothing more to send (its kind reached its last stage).
    pub(crate) fn is_done(&self) -> bool {
        match self {
            State::Done => true,
            State::Read(r) => r.is_done(),
            State::MetaRead(m) => m.is_done(),
            State::Write(w) => w.is_done(),
        }
    }

    /// See `Slot::copies_unsettled`: only a write has copies.
    pub(crate) fn copies_unsettled(&self) -> bool {
        matches!(self, State::Write(w) if w.copies_unsettled())
    }
}

/// One request's context, the same at every step of its flow.
#[derive(Debug)]
pub(crate) struct Flow<'a, I: Inbox, P: Pool = ServerPool> {
    /// The configuration the request started under.
    pub w: &'a Cluster<P>,
    /// Where its server replies go.
    pub inbox: &'a Rc<I>,
    /// Its number in the session: the token its replies carry.
    pub seq: u64,
    /// The request, as parsed from the slot's frame.
    pub req: Request,
}

impl<I: Inbox, P: Pool> Flow<'_, I, P> {
    /// Where the reply of the slot's sub-request number `part` goes.
    pub(crate) fn reply_to(&self, part: usize) -> ReplyTo {
        ReplyTo {
            sink: self.inbox.clone(),
            token: self.seq,
            part: part as u32,
        }
    }
}

/// A request's first step: its first sub-requests (or its reply at once,
/// when no server can take it).
pub(crate) fn start(f: &Flow<'_, impl Inbox, impl Pool>, slot: &mut Slot, kind: Kind) {
    if let Some(t) = &f.w.transition {
        if super::transition::changes_items(&f.req) {
            if kind == Kind::Read {
                for key in f.req.keys(&slot.frame) {
                    t.note(f.w, key);
                }
            } else {
                t.note(f.w, &super::route_key(&slot.frame, &f.req));
            }
        }
    }
    match kind {
        Kind::Read => read::start(f, slot),
        Kind::MetaRead => meta_read::start(f, slot),
        Kind::Write => write::start(f, slot),
    }
}

/// The client's reply to a finished request.
pub(crate) fn render(
    w: &Cluster<impl Pool>,
    slot: &Slot,
    req: &Request,
    kind: Kind,
    out: &mut OutQueue,
) {
    match kind {
        Kind::Read => read::render(w, slot, req, out),
        Kind::MetaRead => meta_read::render(w, slot, req, out),
        Kind::Write => write::render(w, slot, req, out),
    }
}

/// Takes the slot's next steps for as long as it has one and waits for
/// nothing: a step whose sub-requests all failed at once (servers down)
/// leaves it ready for the next right away.
pub(crate) fn run(f: &Flow<'_, impl Inbox, impl Pool>, slot: &mut Slot) {
    while slot.wants_step() {
        advance(f, slot);
    }
}

/// All of a slot's parts are in: take its next step (which may send more
/// parts, or finish it). Which step that is, its kind's module decides
/// from the stage only it sees.
fn advance(f: &Flow<'_, impl Inbox, impl Pool>, slot: &mut Slot) {
    match slot.state {
        State::Done => {}
        State::Read(_) => read::advance(f, slot),
        State::MetaRead(_) => meta_read::advance(f, slot),
        State::Write(_) => write::advance(f, slot),
    }
}

/// The HA rules in-process: the real read and write steps against fake
/// servers (`ha::fake`) on tokio's paused clock, so that when each answer
/// comes is exact. The same rules are tested against memcached processes
/// in tests/ha*.rs.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use tokio::task::LocalSet;
    use tokio::time::Instant;

    use super::*;
    use crate::ha::fake::{cluster, request, run_one, FakePool, Replies};

    /// One primary, one backup: every key's replicas are [0, 1].
    const PRIMARY_AND_BACKUP: &[&str] = &["-s", "127.0.0.1:1", "-b", "127.0.0.1:2"];

    /// Runs a read to its end; returns what its client gets.
    async fn read(w: &Cluster<FakePool>, line: &str) -> String {
        request_of_kind(w, line, Kind::Read).await
    }

    /// Runs a request of `kind` to its end; returns what its client gets.
    async fn request_of_kind(w: &Cluster<FakePool>, line: &str, kind: Kind) -> String {
        let replies = Rc::new(Replies::default());
        let (frame, req) = request(line);
        let f = Flow {
            w,
            inbox: &replies,
            seq: 0,
            req,
        };
        let mut slot = Slot::new(frame, req);
        start(&f, &mut slot, kind);
        run_one(&f, &mut slot).await;
        let mut out = OutQueue::new();
        render(w, &slot, &req, kind, &mut out);
        let mut bytes = Vec::new();
        out.write_to(|iov| {
            iov.iter().for_each(|s| bytes.extend_from_slice(s));
            Ok(iov.iter().map(|s| s.len()).sum())
        })
        .unwrap();
        String::from_utf8(bytes).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_whose_primary_fails_is_served_by_the_backup() {
        LocalSet::new()
            .run_until(async {
                let (w, pools) = cluster(PRIMARY_AND_BACKUP);
                pools[0].put("k", "old");
                pools[0].set_failing(true);
                pools[1].put("k", "v");
                assert_eq!(read(&w, "get k\r\n").await, "VALUE k 0 1\r\nv\r\nEND\r\n");
                assert_eq!(pools[1].log(), ["mg k v f t"]);
                // Only a primary that answered (a miss) is repaired.
                assert_eq!(pools[0].log(), ["get k"]);
                assert_eq!(w.stats.backup_hits.get(), 1);

                // Once it is marked down, reads go to the backup first.
                let primary = w.servers[0].health();
                assert!(primary.record_failure(1, &"test", None));
                assert_eq!(read(&w, "get k\r\n").await, "VALUE k 0 1\r\nv\r\nEND\r\n");
                assert_eq!(pools[0].log(), ["get k"], "a down primary is not asked");
                assert_eq!(pools[1].log(), ["mg k v f t", "get k"]);
                assert_eq!(w.stats.failovers.get(), 1);
            })
            .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_backup_hit_is_copied_to_the_primary_before_the_client_is_answered() {
        LocalSet::new()
            .run_until(async {
                let (w, pools) = cluster(PRIMARY_AND_BACKUP);
                // The primary restarted empty; the backup kept the item.
                pools[1].put("k", "v");
                let started = Instant::now();
                assert_eq!(read(&w, "get k\r\n").await, "VALUE k 0 1\r\nv\r\nEND\r\n");
                assert_eq!(pools[0].log(), ["get k", "add k 0 0 1"]);
                assert_eq!(pools[0].get("k").as_deref(), Some("v"));
                assert_eq!(w.stats.repairs.get(), 1);
                // Three rounds, one after the other: the primary's miss, the
                // backup's hit, and the repair the reply waited for.
                assert_eq!(started.elapsed(), Duration::from_millis(3));
            })
            .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_repair_older_than_a_write_past_the_primary_is_undone() {
        LocalSet::new()
            .run_until(async {
                let (w, pools) = cluster(PRIMARY_AND_BACKUP);
                pools[1].put("k", "v");
                // The repair's add lands; meanwhile (after the backup was
                // read) a write went past the primary and recorded the key
                // as missed there: the copy may be older than that write.
                pools[0].set_latency(Duration::from_millis(10));
                let primary = w.servers[0].health().clone();
                tokio::task::spawn_local(async move {
                    tokio::time::sleep(Duration::from_millis(15)).await;
                    primary.missed.record(b"k");
                });
                assert_eq!(read(&w, "get k\r\n").await, "VALUE k 0 1\r\nv\r\nEND\r\n");
                assert_eq!(w.stats.repairs.get(), 0);
                assert_eq!(w.stats.repairs_skipped.get(), 1);
                // The undo is a background delete on the add's connection.
                tokio::time::sleep(Duration::from_millis(20)).await;
                assert_eq!(pools[0].log(), ["get k", "add k 0 0 1", "delete k"]);
                assert_eq!(pools[0].get("k"), None);
            })
            .await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_incr_whose_primary_fails_is_applied_once_on_the_backup() {
        LocalSet::new()
            .run_until(async {
                let (w, pools) = cluster(PRIMARY_AND_BACKUP);
                pools[0].put("n", "5");
                pools[0].set_failing(true);
                pools[1].put("n", "5");
                let reply = request_of_kind(&w, "incr n 1\r\n", Kind::Write).await;
                assert_eq!(reply, "6\r\n");
                // Each replica was sent it once: never applied twice.
                assert_eq!(pools[0].log(), ["incr n 1"]);
                assert_eq!(pools[1].log(), ["incr n 1"]);
                assert_eq!(pools[1].get("n").as_deref(), Some("6"));
                // The primary may or may not have applied it: it must not
                // serve the key until it is invalidated there.
                assert!(!w.servers[0].health().serves(b"n"));
                assert_eq!(w.stats.failovers.get(), 1);
            })
            .await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_add_on_a_primary_that_lost_the_item_does_not_steal_it() {
        LocalSet::new()
            .run_until(async {
                let (w, pools) = cluster(PRIMARY_AND_BACKUP);
                // The primary restarted empty; the backup holds the lock.
                pools[1].put("lock", "a");
                let reply = request_of_kind(&w, "add lock 0 0 1\r\nb\r\n", Kind::Write).await;
                assert_eq!(reply, "NOT_STORED\r\n");
                // The backup was asked first, and the primary not at all.
                assert_eq!(pools[1].log(), ["add lock 0 0 1"]);
                assert!(pools[0].log().is_empty());
                assert_eq!(pools[1].get("lock").as_deref(), Some("a"));

                // Free, it is created on both, backup first.
                let reply = request_of_kind(&w, "add free 0 0 1\r\nb\r\n", Kind::Write).await;
                assert_eq!(reply, "STORED\r\n");
                assert_eq!(pools[0].get("free").as_deref(), Some("b"));
                assert_eq!(pools[1].get("free").as_deref(), Some("b"));
            })
            .await;
    }
}
