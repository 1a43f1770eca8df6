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
}

impl Queued {
    /// A request dispatched under `worker`.
    pub(crate) fn new(slot: Slot, worker: Rc<Worker>) -> Queued {
        Queued {
            slot,
            worker: Some(worker),
            fenced: false,
        }
    }

    /// A reply the proxy made at once.
    pub(crate) fn local(local: Local) -> Queued {
        Queued {
            slot: Slot::local(local),
            worker: None,
            fenced: false,
        }
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
