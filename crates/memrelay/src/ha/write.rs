//! Writes: `set add replace append prepend cas delete incr decr touch`.
//!
//! A write goes to the first replica that can serve its key (the primary
//! when it is up and not stale for the key). The client gets that replica's
//! answer. Then:
//! - if the primary answered, the backups are brought to the same state
//!   according to what the primary said ([`mirror_plan`]), in the
//!   background;
//! - if a replica fails, the write moves to the next one. A replica is sent
//!   a given write at most once, so a conditional or arithmetic command is
//!   never applied twice anywhere; the replica that failed is recorded as
//!   having missed the key, because it may or may not have applied it, and
//!   is invalidated for it before it serves it again.

use std::rc::Rc;

use bytes::BytesMut;
use memrelay_protocol::{compose, Command, Expect, Request, ResponseKind};

use super::mirror::Check;
use crate::backend::ReplyTo;
use crate::proxy::session::Inbox;
use crate::proxy::slot::{Local, Part, Slot, Stage};
use crate::proxy::Worker;

/// What a backup must do after the primary answered a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorPlan {
    /// Nothing changed on the primary.
    Nothing,
    /// Store the request's value, flags and TTL (the primary now holds
    /// exactly that item).
    Set,
    /// Apply the same command (append, prepend, incr, decr, touch).
    Same,
    /// The primary holds no item: neither may the backup.
    Delete,
}

/// The mirroring rule for each command and primary answer.
pub fn mirror_plan(command: Command, answer: ResponseKind) -> MirrorPlan {
    use MirrorPlan::*;
    use ResponseKind as R;
    match (command, answer) {
        (Command::Set | Command::Add | Command::Replace | Command::Cas, R::Stored) => Set,
        // memcached unlinks the old item when a set fails (too large, out
        // of memory): the backup must not keep it either.
        (Command::Set, R::Error) => Delete,
        (Command::Replace | Command::Append | Command::Prepend, R::NotStored) => Delete,
        (Command::Append | Command::Prepend, R::Stored) => Same,
        (Command::Cas, R::NotFound) => Delete,
        (Command::Delete, R::Deleted | R::NotFound) => Delete,
        (Command::Incr | Command::Decr, R::Number(_)) => Same,
        (Command::Incr | Command::Decr | Command::Touch, R::NotFound) => Delete,
        (Command::Touch, R::Touched) => Same,
        _ => Nothing,
    }
}

fn expect_of(command: Command) -> Expect {
    match command {
        Command::Delete => Expect::Delete,
        Command::Incr | Command::Decr => Expect::Arith,
        Command::Touch => Expect::Touch,
        _ => Expect::Storage,
    }
}

/// Writes the request line for `command` (the value is sent separately).
fn compose_line(b: &mut BytesMut, req: &Request, command: Command, key: &[u8]) {
    match command {
        Command::Delete => compose::delete(b, key),
        Command::Incr | Command::Decr => compose::arith(b, command, key, req.delta),
        Command::Touch => compose::touch(b, key, req.exptime),
        _ => compose::storage_line(
            b,
            command,
            key,
            req.flags,
            req.exptime,
            req.value.len as usize,
            req.cas,
        ),
    }
}

/// Starts a write: sends it to the first replica that can take it.
pub fn start(w: &Worker, inbox: &Rc<Inbox>, seq: u64, slot: &mut Slot, req: &Request) {
    let key = req.key.of(&slot.frame);
    slot.replicas = Some(w.router.replicas(key));
    attempt(w, inbox, seq, slot, req, 0);
}

/// Sends the write to the first serving replica at or after `from`.
fn attempt(w: &Worker, inbox: &Rc<Inbox>, seq: u64, slot: &mut Slot, req: &Request, from: usize) {
    let Some(replicas) = slot.replicas else {
        return;
    };
    let frame = slot.frame.clone();
    let key = req.key.of(&frame);
    let tier = super::first_serving(w, &replicas, key, from, |skipped| {
        // The write goes past this replica: it misses the key.
        w.servers[skipped].health().missed.record(key);
    });
    let Some(tier) = tier else {
        slot.stage = Stage::Done;
        if slot.parts.is_empty() {
            w.stats.server_errors.incr();
            slot.local = Some(Local::Static(if req.noreply {
                b""
            } else {
                b"SERVER_ERROR no server is available for this key\r\n"
            }));
        }
        return;
    };
    if tier > 0 {
        w.stats.failovers.incr();
    }
    let server = replicas.get(tier).unwrap_or(0);
    let value = req
        .command
        .is_storage()
        .then(|| frame.slice(req.value.start as usize..req.value.end()));
    let reply = ReplyTo {
        sink: inbox.clone(),
        token: seq,
        part: slot.parts.len() as u32,
    };
    let queued = w.servers[server].send_for_key(
        key,
        expect_of(req.command),
        reply,
        |b| compose_line(b, req, req.command, key),
        value,
    );
    slot.stage = Stage::Write { tier: tier as u8 };
    slot.push_part(Part::new(server), queued);
}

/// The replica answered or failed: mirror, or move to the next replica.
pub fn advance(
    w: &Worker,
    inbox: &Rc<Inbox>,
    seq: u64,
    slot: &mut Slot,
    req: &Request,
    tier: usize,
) {
    let Some(replicas) = slot.replicas else {
        slot.stage = Stage::Done;
        return;
    };
    let frame = slot.frame.clone();
    let key = req.key.of(&frame);
    let last = slot.parts.len() - 1;
    match slot.result(last) {
        Some(Ok(reply)) => {
            let plan = mirror_plan(req.command, reply.kind);
            let number = match reply.kind {
                ResponseKind::Number(n) => Some(n),
                _ => None,
            };
            slot.stage = Stage::Done;
            // Bring the tiers after the one that answered to its state.
            for next in tier + 1..replicas.len() {
                if let Some(server) = replicas.get(next) {
                    mirror(w, &frame, req, key, server, plan, number);
                }
            }
        }
        Some(Err(_)) => {
            let server = slot.parts[last].server as usize;
            w.servers[server].health().missed.record(key);
            attempt(w, inbox, seq, slot, req, tier + 1);
        }
        None => slot.stage = Stage::Done,
    }
}

/// Applies `plan` to one backup, in the background.
fn mirror(
    w: &Worker,
    frame: &bytes::Bytes,
    req: &Request,
    key: &[u8],
    server: usize,
    plan: MirrorPlan,
    number: Option<u64>,
) {
    let key_bytes = frame.slice(req.key.start as usize..req.key.end());
    if !w.servers[server].health().serves(key) && plan != MirrorPlan::Delete {
        // Down or already stale for this key: it misses this write too.
        w.servers[server].health().missed.record(key);
        return;
    }
    w.stats.mirrors.incr();
    match plan {
        MirrorPlan::Nothing => {}
        MirrorPlan::Delete => w.mirror.delete(server, key_bytes),
        MirrorPlan::Set => {
            let value = frame.slice(req.value.start as usize..req.value.end());
            w.mirror.send(
                server,
                key_bytes,
                Check::Applied,
                Expect::Storage,
                |b| {
                    compose::storage_line(
                        b,
                        Command::Set,
                        key,
                        req.flags,
                        req.exptime,
                        value.len(),
                        0,
                    )
                },
                Some(value.clone()),
            );
        }
        MirrorPlan::Same => {
            let check = match number {
                Some(n) => Check::Number(n),
                None => Check::Applied,
            };
            let value = req
                .command
                .is_storage()
                .then(|| frame.slice(req.value.start as usize..req.value.end()));
            w.mirror.send(
                server,
                key_bytes,
                check,
                expect_of(req.command),
                |b| compose_line(b, req, req.command, key),
                value,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mirror_table() {
        use MirrorPlan::*;
        use ResponseKind as R;
        let table = [
            (Command::Set, R::Stored, Set),
            (Command::Set, R::Error, Delete),
            (Command::Add, R::Stored, Set),
            (Command::Add, R::NotStored, Nothing),
            (Command::Replace, R::Stored, Set),
            (Command::Replace, R::NotStored, Delete),
            (Command::Append, R::Stored, Same),
            (Command::Append, R::NotStored, Delete),
            (Command::Prepend, R::Stored, Same),
            (Command::Cas, R::Stored, Set),
            (Command::Cas, R::Exists, Nothing),
            (Command::Cas, R::NotFound, Delete),
            (Command::Delete, R::Deleted, Delete),
            (Command::Delete, R::NotFound, Delete),
            (Command::Incr, R::Number(5), Same),
            (Command::Incr, R::NotFound, Delete),
            (Command::Incr, R::Error, Nothing),
            (Command::Touch, R::Touched, Same),
            (Command::Touch, R::NotFound, Delete),
        ];
        for (c, a, p) in table {
            assert_eq!(mirror_plan(c, a), p, "{c:?} {a:?}");
        }
    }
}
