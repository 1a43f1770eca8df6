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
use memrelay_protocol::{compose, Command, Expect, MetaStatus, Request, ResponseKind};

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

/// The mirroring rule for each command and primary answer. `mode` is a
/// meta command's `M` flag (0 when absent).
pub fn mirror_plan(command: Command, mode: u8, answer: ResponseKind) -> MirrorPlan {
    use MetaStatus as M;
    use MirrorPlan::*;
    use ResponseKind as R;
    match (command, answer) {
        // Meta set: modes E(add) R(replace) A(append) P(prepend) S(set).
        (Command::MetaSet, R::Meta(M::Hd)) if matches!(mode, b'A' | b'P') => Same,
        (Command::MetaSet, R::Meta(M::Hd)) => Set,
        (Command::MetaSet, R::Meta(M::Ns)) if matches!(mode, b'R' | b'A' | b'P') => Delete,
        (Command::MetaSet, R::Meta(M::Nf)) => Delete,
        (Command::MetaDelete, R::Meta(M::Hd)) => Same,
        (Command::MetaDelete | Command::MetaArith, R::Meta(M::Nf)) => Delete,
        (Command::MetaArith, R::Meta(M::Hd | M::Value)) => Same,
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
        c if c.is_meta() => Expect::Meta,
        Command::Delete => Expect::Delete,
        Command::Incr | Command::Decr => Expect::Arith,
        Command::Touch => Expect::Touch,
        _ => Expect::Storage,
    }
}

/// Writes the request line for `command` (the value is sent separately).
/// `key` is the key as the client wrote it (base64 for meta `b`).
fn compose_line(b: &mut BytesMut, frame: &[u8], req: &Request, command: Command, key: &[u8]) {
    match command {
        c if c.is_meta() => {
            let len = (c == Command::MetaSet).then_some(req.value.len as usize);
            compose::meta_line(b, c, key, len, req.meta.flags.of(frame))
        }
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
    let key = super::route_key(&slot.frame, req);
    slot.replicas = Some(w.router.replicas(&key));
    attempt(w, inbox, seq, slot, req, 0);
}

/// Sends the write to the first serving replica at or after `from`.
fn attempt(w: &Worker, inbox: &Rc<Inbox>, seq: u64, slot: &mut Slot, req: &Request, from: usize) {
    let Some(replicas) = slot.replicas else {
        return;
    };
    let frame = slot.frame.clone();
    let wire_key = req.key.of(&frame);
    let route = super::route_key(&frame, req);
    let key: &[u8] = &route;
    let tier = super::first_serving(w, &replicas, key, from, |skipped| {
        // The write goes past this replica: it misses the key.
        w.servers[skipped].health().missed.record(key);
    });
    let Some(tier) = tier else {
        slot.stage = Stage::Done;
        if slot.parts.is_empty() {
            w.stats.server_errors.incr();
            slot.local = Some(Local::Static(if req.noreply { b"" } else { NO_SERVER }));
        }
        return;
    };
    if tier > 0 {
        w.stats.failovers.incr();
    }
    let server = replicas.get(tier).unwrap_or(0);
    let value = has_value(req).then(|| frame.slice(req.value.start as usize..req.value.end()));
    let reply = ReplyTo {
        sink: inbox.clone(),
        token: seq,
        part: slot.parts.len() as u32,
    };
    let queued = w.servers[server].send_for_key(
        key,
        expect_of(req.command),
        reply,
        |b| compose_line(b, &frame, req, req.command, wire_key),
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
    let route = super::route_key(&frame, req);
    let key: &[u8] = &route;
    let last = slot.parts.len() - 1;
    match slot.result(last) {
        Some(Ok(reply)) => {
            let plan = mirror_plan(req.command, req.meta.mode, reply.kind);
            let number = match reply.kind {
                ResponseKind::Number(n) => Some(n),
                _ => None,
            };
            slot.stage = Stage::Done;
            // Bring the tiers after the one that answered to its state.
            for next in tier + 1..replicas.len() {
                if let Some(server) = replicas.get(next) {
                    mirror(w, &frame, req, &route, server, plan, number);
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

/// Applies `plan` to one backup, in the background. `route` is the routing
/// key (decoded for meta `b` keys).
fn mirror(
    w: &Worker,
    frame: &bytes::Bytes,
    req: &Request,
    route: &bytes::Bytes,
    server: usize,
    plan: MirrorPlan,
    number: Option<u64>,
) {
    let key: &[u8] = route;
    let key_bytes = route.clone();
    if !w.servers[server].health().serves(key) && plan != MirrorPlan::Delete {
        // Down or already stale for this key: it misses this write too.
        w.servers[server].health().missed.record(key);
        return;
    }
    if plan != MirrorPlan::Nothing {
        w.stats.mirrors.incr();
    }
    if req.command.is_meta() && matches!(plan, MirrorPlan::Set | MirrorPlan::Same) {
        return mirror_meta(w, frame, req, server, key_bytes, plan);
    }
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
            let value =
                has_value(req).then(|| frame.slice(req.value.start as usize..req.value.end()));
            w.mirror.send(
                server,
                key_bytes,
                check,
                expect_of(req.command),
                |b| compose_line(b, frame, req, req.command, key),
                value,
            );
        }
    }
}

/// A meta write's mirror: the same command, without the flags that only
/// make sense on the primary (`C` compares the primary's CAS; `I` goes with
/// it; `q`, `O`, `k` and the return flags change nothing stored), and, for
/// `Set`, without the mode (the primary now holds exactly this item).
fn mirror_meta(
    w: &Worker,
    frame: &bytes::Bytes,
    req: &Request,
    server: usize,
    route: bytes::Bytes,
    plan: MirrorPlan,
) {
    let wire_key = req.key.of(frame);
    let flags = req.meta.flags.of(frame);
    let drop_mode = plan == MirrorPlan::Set;
    let keep = |t: &[u8]| match t[0] {
        b'C' | b'I' | b'O' | b'k' | b'c' | b's' | b't' | b'f' | b'v' | b'h' | b'l' => false,
        b'M' => !drop_mode,
        _ => true,
    };
    let len = (req.command == Command::MetaSet).then_some(req.value.len as usize);
    let value = len.map(|_| frame.slice(req.value.start as usize..req.value.end()));
    w.mirror.send(
        server,
        route,
        Check::Applied,
        Expect::Meta,
        |b| compose::meta_line_filtered(b, req.command, wire_key, len, flags, keep),
        value,
    );
}

/// Whether the request carries a data block.
fn has_value(req: &Request) -> bool {
    req.command.is_storage() || req.command == Command::MetaSet
}

/// The reply when no replica of a key can take a write.
pub const NO_SERVER: &[u8] = b"SERVER_ERROR no server is available for this key\r\n";

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
            assert_eq!(mirror_plan(c, 0, a), p, "{c:?} {a:?}");
        }
        use MetaStatus as M;
        let meta = [
            (Command::MetaSet, 0, R::Meta(M::Hd), Set),
            (Command::MetaSet, b'E', R::Meta(M::Hd), Set),
            (Command::MetaSet, b'E', R::Meta(M::Ns), Nothing),
            (Command::MetaSet, b'R', R::Meta(M::Ns), Delete),
            (Command::MetaSet, b'A', R::Meta(M::Hd), Same),
            (Command::MetaSet, b'A', R::Meta(M::Ns), Delete),
            (Command::MetaSet, 0, R::Meta(M::Ex), Nothing),
            (Command::MetaSet, 0, R::Meta(M::Nf), Delete),
            (Command::MetaDelete, 0, R::Meta(M::Hd), Same),
            (Command::MetaDelete, 0, R::Meta(M::Nf), Delete),
            (Command::MetaDelete, 0, R::Meta(M::Ex), Nothing),
            (Command::MetaArith, 0, R::Meta(M::Value), Same),
            (Command::MetaArith, 0, R::Meta(M::Nf), Delete),
            (Command::MetaArith, 0, R::Meta(M::Ex), Nothing),
        ];
        for (c, m, a, p) in meta {
            assert_eq!(mirror_plan(c, m, a), p, "{c:?} {m} {a:?}");
        }
    }
}
