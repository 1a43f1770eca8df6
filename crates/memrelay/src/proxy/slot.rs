//! A client request between parse and reply, as the session queues it.
//!
//! The slot itself ([`Slot`]: the request's frame, its sub-requests, its
//! stage) is advanced by the HA steps and declared in `crate::ha::slot`;
//! the session adds what only it needs: the configuration the request
//! started under.

use std::ops::{Deref, DerefMut};
use std::rc::Rc;

pub(crate) use crate::ha::slot::{Local, Part, Slot};

use super::Worker;

/// A slot in the session's FIFO.
#[derive(Debug)]
pub(crate) struct Queued {
    pub slot: Slot,
    /// The configuration the request started under: its later stages use
    /// it too, whatever a reload installed meanwhile (server indexes and
    /// routing mean what they meant when it started). None for a reply the
    /// proxy made at once.
    pub worker: Option<Rc<Worker>>,
    /// It holds its keys in the session's fences until it is finished
    /// (set and cleared by `proxy::fence::Fences` alone).
    pub(super) fenced: bool,
    /// The fleet's hints its steps made, this worker thread's numbers
    /// `first..=last` (`crate::fleet::hints_made`; 0: none): a write is
    /// acknowledged only if the fleet took them as `--peer-confirm`
    /// requires.
    pub(super) hints: (u64, u64),
}

impl Queued {
    /// A request dispatched under `worker`.
    pub(crate) fn new(slot: Slot, worker: Rc<Worker>) -> Queued {
        Queued {
            slot,
            worker: Some(worker),
            fenced: false,
            hints: (0, 0),
        }
    }

    /// A reply the proxy made at once.
    pub(crate) fn local(local: Local) -> Queued {
        Queued {
            slot: Slot::local(local),
            worker: None,
            fenced: false,
            hints: (0, 0),
        }
    }

    /// A step of it ran, and this thread's hints were numbered up to
    /// `before` when it began: any made since are its own (a worker
    /// thread steps one request at a time). Kept as one range from its
    /// first hint to its last: hints other requests made between two of
    /// its steps fall inside it, so a batch of theirs that too few peers
    /// took refuses it too. That errs only towards `SERVER_ERROR`, and
    /// only while peers are not taking hints.
    pub(crate) fn stepped(&mut self, before: u64) {
        let now = crate::fleet::hints_made();
        if now != before {
            if self.hints.0 == 0 {
                self.hints.0 = before + 1;
            }
            self.hints.1 = now;
        }
    }

    /// Whether its reply may say what the servers said: a write whose
    /// hints too few peers took (`--peer-confirm`) may not be
    /// acknowledged. A read (`gat` and `mg` included) is answered as it
    /// is: the hints a read makes (a repair or a TTL copy that failed)
    /// protect later reads, and its value is no acknowledgement.
    pub(crate) fn fleet_confirmed(&self) -> bool {
        let (first, last) = self.hints;
        first == 0
            || !self.slot.req.is_some_and(|r| r.command.is_write())
            || crate::fleet::confirmed(first, last)
    }
}

impl Deref for Queued {
    type Target = Slot;

    fn deref(&self) -> &Slot {
        &self.slot
    }
}

impl DerefMut for Queued {
    fn deref_mut(&mut self) -> &mut Slot {
        &mut self.slot
    }
}
