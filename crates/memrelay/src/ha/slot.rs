//! A client request between parse and reply.
//!
//! A slot holds the request's frame (its key and value live there), the
//! sub-requests sent for it ([`Part`]s, filled in as servers answer), and
//! where its flow stands ([`State`]: one variant per kind of request, each
//! with a stage only its own module sees). Stages exist because a request
//! may need more than one round: a read that missed on the primary asks the
//! backup; a write whose primary failed is sent to the backup. The session
//! advances a slot each time all its pending parts are in, until it is done.
//!
//! The HA steps ([`super::read`], [`super::meta_read`], [`super::write`])
//! are what advance a slot, so its types live here; the session keeps each
//! slot together with the configuration it started under
//! (`proxy::slot::Queued`).

use bytes::Bytes;
use memrelay_protocol::{Command, Request};
use smallvec::SmallVec;

use super::flow::State;
use crate::backend::{BackendError, BackendResult};
use crate::router::Replicas;

/// What a sub-request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The request itself, on the replica that takes it.
    Main,
    /// A read's second round: key number `key` looked up on a backup;
    /// `epoch`, its primary's missed-key epoch just before (see
    /// `ha::read::after_repair`; unused by meta reads, whose repair takes
    /// its own).
    Fallback { key: u32, epoch: u64 },
    /// A write copied to a backup; `Some(n)`: an `incr`/`decr` whose copy
    /// must reach the primary's number.
    Mirror(Option<u64>),
    /// A backup hit (key number `key`) written back to the primary
    /// (`add`); `epoch` as in `Fallback`.
    Repair { key: u32, epoch: u64 },
    /// A delete of a backup's copy that disagreed with the primary.
    Compensate,
    /// An `mg` backup hit, fetched again with what a copy needs (value,
    /// flags, TTL) to repair the primary; `epoch` as in `Repair`.
    RepairFetch { epoch: u64 },
    /// A create-if-absent write (`add`, `ms ... ME`) sent to the first
    /// backup before the primary: the backup may hold an acknowledged item
    /// the primary lost (see `ha::write::start`).
    Create,
    /// An `mg ... N` sent whole (with `N`) once neither replica had the
    /// item (see `ha::meta_read::start`).
    Vivify,
    /// A read that changed a TTL (`gat`, `gats`, `mg ... T`): the same TTL
    /// set on a later tier for key number `key`.
    Touch { key: u32 },
    /// That tier had no item (its copy expired a moment before the
    /// primary's: each memcached's clock ticks on its own): the item the
    /// read found is added there with the new TTL.
    TtlCopy { key: u32 },
    /// A `touch` the primary took found no item on a backup: the primary's
    /// item, read to be added there (`TtlCopy`, see `ha::write`).
    TtlFetch,
}

/// One sub-request and, once it came, its result.
#[derive(Debug)]
pub(crate) struct Part {
    pub server: u16,
    pub role: Role,
    pub result: Option<BackendResult>,
    /// Its result was acted upon (a mirror checked once, not again).
    pub settled: bool,
}

impl Part {
    pub(crate) fn new(server: usize) -> Part {
        Part::with_role(server, Role::Main)
    }

    pub(crate) fn with_role(server: usize, role: Role) -> Part {
        Part {
            server: server as u16,
            role,
            result: None,
            settled: false,
        }
    }
}

/// A reply the proxy makes itself.
#[derive(Debug)]
pub(crate) enum Local {
    Static(&'static [u8]),
    Owned(Vec<u8>),
    /// Send this, then close the connection (quit, fatal input).
    Close(&'static [u8]),
}

#[derive(Debug)]
pub(crate) struct Slot {
    pub frame: Bytes,
    pub req: Option<Request>,
    /// Parts still to come in the current stage: counted up only by
    /// [`push_part`](Slot::push_part) and down only by
    /// [`fill`](Slot::fill), so a step cannot lose count of them.
    pending: u32,
    pub parts: SmallVec<[Part; 2]>,
    /// Single-key commands: where the key lives.
    pub replicas: Option<Replicas>,
    /// Where its flow stands: set by the HA steps alone, each kind's in
    /// its own module; the layers above ask [`is_done`](Slot::is_done),
    /// [`wants_step`](Slot::wants_step) and
    /// [`copies_unsettled`](Slot::copies_unsettled).
    pub(super) state: State,
    pub local: Option<Local>,
    /// When the request was parsed (for the latency histograms).
    pub started: std::time::Instant,
    /// Bytes of server replies held in `parts` (see `session::Inbox`).
    pub held: usize,
}

impl Slot {
    pub(crate) fn new(frame: Bytes, req: Request) -> Slot {
        Slot {
            frame,
            req: Some(req),
            pending: 0,
            parts: SmallVec::new(),
            replicas: None,
            state: State::Done,
            local: None,
            started: std::time::Instant::now(),
            held: 0,
        }
    }

    pub(crate) fn local(local: Local) -> Slot {
        Slot {
            frame: Bytes::new(),
            req: None,
            pending: 0,
            parts: SmallVec::new(),
            replicas: None,
            state: State::Done,
            local: Some(local),
            started: std::time::Instant::now(),
            held: 0,
        }
    }

    /// A read: its replies carry values, and only they can be large.
    pub(crate) fn is_read(&self) -> bool {
        self.req.is_some_and(|r| {
            r.command.is_retrieval() || matches!(r.command, Command::MetaGet | Command::MetaDebug)
        })
    }

    /// Why a read is refused for its size, if it is: one of its replies
    /// was too large, or arrived while its client was owed too much.
    pub(crate) fn oversize(&self) -> Option<BackendError> {
        self.parts.iter().find_map(|p| match &p.result {
            Some(Err(e)) if e.failure.is_oversize() => Some(*e),
            _ => None,
        })
    }

    pub(crate) fn is_done(&self) -> bool {
        self.pending == 0 && self.state.is_done()
    }

    /// A write that its primary took, or may have taken, while its copies
    /// on the backups are not all made and checked (it is still on the
    /// primary, being copied, or was created on the first backup first).
    /// Given up now, it could leave a backup with another item than the
    /// primary's. A write that failed over to a backup is not one: that
    /// backup may hold the key's only copy.
    pub(crate) fn copies_unsettled(&self) -> bool {
        self.state.copies_unsettled()
    }

    /// Sub-requests of the current stage are still to come.
    pub(crate) fn is_waiting(&self) -> bool {
        self.pending > 0
    }

    /// All of the current stage's parts are in and there is a next step
    /// to take (`ha::flow::advance`).
    pub(crate) fn wants_step(&self) -> bool {
        self.pending == 0 && !self.state.is_done()
    }

    /// Whether part `part` was sent and its result has not come yet.
    pub(crate) fn awaits(&self, part: u32) -> bool {
        matches!(self.parts.get(part as usize), Some(p) if p.result.is_none())
    }

    /// Part `part`'s result came. Returns true when it was the last one the
    /// stage waited for. A result for a part not awaited is ignored.
    pub(crate) fn fill(&mut self, part: u32, result: BackendResult) -> bool {
        if !self.awaits(part) {
            return false;
        }
        if let Some(p) = self.parts.get_mut(part as usize) {
            p.result = Some(result);
        }
        self.pending -= 1;
        self.pending == 0
    }

    /// Records the outcome of queueing a sub-request: wait for it, or keep
    /// the immediate failure as its result.
    pub(crate) fn push_part(&mut self, mut part: Part, queued: Result<(), BackendError>) {
        match queued {
            Ok(()) => self.pending += 1,
            Err(e) => part.result = Some(Err(e)),
        }
        self.parts.push(part);
    }

    pub(crate) fn result(&self, part: usize) -> Option<&BackendResult> {
        self.parts.get(part).and_then(|p| p.result.as_ref())
    }

    /// The write's latest main part: the replica that took it (earlier
    /// main parts are replicas it failed over from).
    pub(crate) fn main_part(&self) -> Option<usize> {
        self.parts.iter().rposition(|p| p.role == Role::Main)
    }

    /// Whether the write was copied to the backups in parallel with the
    /// primary (a blind set) rather than after its answer.
    pub(crate) fn mirrored_in_parallel(&self) -> bool {
        self.parts.iter().any(|p| matches!(p.role, Role::Mirror(_)))
    }
}
