//! What every step of a request's flow works with, besides its [`Slot`]:
//! the configuration it started under, where its replies go, which request
//! of the session it is, and the request itself.
//!
//! The steps of `ha::read` and `ha::write` take a `Flow` and the slot they
//! advance; [`advance`] is the one place that picks a slot's next step from
//! its stage.

use std::rc::Rc;

use memrelay_protocol::Request;

use super::slot::{Slot, Stage};
use super::{Cluster, Inbox, Pool};
use crate::backend::{ReplyTo, ServerPool};

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

/// Takes the slot's next steps for as long as it has one and waits for
/// nothing: a step whose sub-requests all failed at once (servers down)
/// leaves it ready for the next right away.
pub(crate) fn run(f: &Flow<'_, impl Inbox, impl Pool>, slot: &mut Slot) {
    while slot.wants_step() {
        advance(f, slot);
    }
}

/// All of a slot's parts are in: take its next step (which may send more
/// parts, or finish it).
fn advance(f: &Flow<'_, impl Inbox, impl Pool>, slot: &mut Slot) {
    use super::{read, write};
    let meta = f.req.command.is_meta();
    match slot.stage {
        Stage::Done => {}
        Stage::Read if meta => read::after_meta_round_one(f, slot),
        Stage::Fallback if meta => read::after_meta_fallback(f, slot),
        Stage::Read => read::after_round_one(f, slot),
        Stage::Fallback => read::after_fallback(f, slot),
        Stage::Repair if meta => read::after_meta_repair(f.w, slot, &f.req),
        Stage::Repair => read::after_repair(f.w, slot, &f.req),
        Stage::MetaRepairFetch => read::after_meta_repair_fetch(f, slot),
        Stage::Write { tier } => write::advance(f, slot, tier as usize),
        Stage::Mirror => write::after_mirrors(f, slot),
        Stage::Create => write::after_create(f, slot),
    }
}
