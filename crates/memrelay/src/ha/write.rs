//! Writes: `set add replace append prepend cas delete incr decr touch`.
//!
//! A write goes to the first replica that can serve its key (the primary
//! when it is up and not stale for the key). The client gets that replica's
//! answer, once the backups are in the same state:
//! - if the primary answered, the backups are brought to that state
//!   according to what it said ([`mirror_plan`]); a plain `set` is copied
//!   in parallel with the primary, everything else after its answer. The
//!   client's reply waits for the copies, so the next write a client makes
//!   can never be overtaken by this one's copy (copies travel on other
//!   connections, from other worker threads); a backup that fails or
//!   disagrees is recorded as having missed the key;
//! - if a replica fails, the write moves to the next one. A replica is sent
//!   a given write at most once, so a conditional or arithmetic command is
//!   never applied twice anywhere; the replica that failed is recorded as
//!   having missed the key, because it may or may not have applied it, and
//!   is invalidated for it before it serves it again.

use bytes::BytesMut;
use memrelay_protocol::{compose, Command, Expect, MetaStatus, Request, ResponseKind};

use super::flow::{Flow, State};
use super::slot::{Local, Part, Role, Slot};
use super::{Cluster, Inbox, Pool};
use crate::net::outqueue::OutQueue;
use smallvec::SmallVec;

/// What a backup must do after the primary answered a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MirrorPlan {
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
pub(crate) fn mirror_plan(command: Command, mode: u8, answer: ResponseKind) -> MirrorPlan {
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
fn compose_line(
    b: &mut BytesMut,
    frame: &[u8],
    req: &Request,
    command: Command,
    key: &[u8],
    wire: super::MetaWire,
) {
    match command {
        c if c.is_meta() => super::write_meta(b, frame, req, key, wire),
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

/// A write's own state, in its slot (`State::Write`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Write(WriteStage);

/// Where a write stands. Each step returns the next (`advance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteStage {
    /// Sent to the replica at `tier` (0 = primary). `vivify_pending`: an
    /// autovivifying `ma ... N` travels without its `N`, so that it creates
    /// the item only once no replica has it (see `after_answer`).
    Sent { tier: u8, vivify_pending: bool },
    /// Its copies on the backups, which the client's reply waits for.
    Mirror,
    /// A create-if-absent write asked the first backup first.
    Create { vivify_pending: bool },
    /// A `touch` found no item on a backup: the primary's item is read...
    TtlFetch,
    /// ...and added to it (`restore_expired_copies`).
    TtlCopy,
    /// Nothing more to send.
    Done,
}

impl Write {
    pub(crate) fn is_done(&self) -> bool {
        self.0 == WriteStage::Done
    }

    /// See `Slot::copies_unsettled`: still on the primary, being copied,
    /// or created on the first backup first.
    pub(crate) fn copies_unsettled(&self) -> bool {
        matches!(
            self.0,
            WriteStage::Sent { tier: 0, .. }
                | WriteStage::Mirror
                | WriteStage::Create { .. }
                | WriteStage::TtlFetch
                | WriteStage::TtlCopy
        )
    }
}

/// All of a write's parts are in: its next step.
pub(crate) fn advance(f: &Flow<'_, impl Inbox, impl Pool>, slot: &mut Slot) {
    let State::Write(Write(stage)) = slot.state else {
        return;
    };
    let next = match stage {
        WriteStage::Sent {
            tier,
            vivify_pending,
        } => after_answer(f, slot, tier as usize, vivify_pending),
        WriteStage::Mirror => after_mirrors(f, slot),
        WriteStage::Create { vivify_pending } => after_create(f, slot, vivify_pending),
        WriteStage::TtlFetch => after_ttl_fetch(f, slot),
        WriteStage::TtlCopy => after_ttl_copies(f, slot),
        WriteStage::Done => WriteStage::Done,
    };
    slot.state = State::Write(Write(next));
}

/// Starts a write: sends it to the first replica that can take it.
pub(crate) fn start(f: &Flow<'_, impl Inbox, impl Pool>, slot: &mut Slot) {
    let (w, req) = (f.w, &f.req);
    let key = super::route_key(&slot.frame, req);
    let replicas = w.router.replicas(&key);
    for s in replicas.iter() {
        w.servers[s].health().note_write(&key);
    }
    slot.replicas = Some(replicas);
    let vivify_pending = super::vivifies_later(w, req);
    if creates_if_absent(req) {
        if let (Some(p), Some(b)) = (replicas.get(0), replicas.get(1)) {
            let key: &[u8] = &key;
            if w.servers[p].health().serves(key) && w.servers[b].health().serves(key) {
                ask_backup_first(f, slot, b);
                slot.state = State::Write(Write(WriteStage::Create { vivify_pending }));
                return;
            }
        }
    }
    let stage = attempt(f, slot, 0, vivify_pending);
    slot.state = State::Write(Write(stage));
}

/// `add` and `ms ... ME` store only if the key holds no item. The primary
/// alone cannot say: after it restarted, or had the key invalidated, it
/// lacks an item the backup still holds, and a lock taken with `add` would
/// be stolen. So the first backup is asked first: if it holds an item, that
/// is the answer (`NOT_STORED`), and the primary is not touched (a read
/// repairs it); if it stored, the primary is asked next, and its answer is
/// the client's (see `after_create`). Both replicas then hold the new item
/// or the answer is "not stored". This costs what the primary-then-mirror
/// order cost: two round trips when stored, one when not.
fn creates_if_absent(req: &Request) -> bool {
    match req.command {
        Command::Add => true,
        Command::MetaSet => req.meta.mode == b'E' && !req.meta.cas,
        _ => false,
    }
}

fn ask_backup_first(f: &Flow<'_, impl Inbox, impl Pool>, slot: &mut Slot, backup: usize) {
    let (w, req) = (f.w, &f.req);
    let frame = slot.frame.clone();
    let route = super::route_key(&frame, req);
    let wire_key = req.key.of(&frame);
    let value = frame.slice(req.value.start as usize..req.value.end());
    let wire = super::meta_wire(req, true);
    let expect = if req.command.is_meta() {
        wire.expect
    } else {
        expect_of(req.command)
    };
    let reply = f.reply_to(slot.parts.len());
    let queued = w.servers[backup].send_for_key(
        &route,
        expect,
        reply,
        |b| compose_line(b, &frame, req, req.command, wire_key, wire),
        Some(value),
    );
    slot.push_part(Part::with_role(backup, Role::Create), queued);
}

/// Whether a create-if-absent write stored its item.
fn stored(kind: ResponseKind) -> Option<bool> {
    match kind {
        // A quiet `ms` whose success memcached suppressed.
        ResponseKind::Stored | ResponseKind::Meta(MetaStatus::Hd | MetaStatus::Mn) => Some(true),
        ResponseKind::NotStored | ResponseKind::Meta(MetaStatus::Ns) => Some(false),
        _ => None,
    }
}

/// The first backup answered a create-if-absent write.
fn after_create(
    f: &Flow<'_, impl Inbox, impl Pool>,
    slot: &mut Slot,
    vivify_pending: bool,
) -> WriteStage {
    let (w, req) = (f.w, &f.req);
    let Some(replicas) = slot.replicas else {
        return WriteStage::Done;
    };
    let route = super::route_key(&slot.frame, req);
    let Some(first) = slot.parts.first() else {
        return WriteStage::Done;
    };
    let backup = first.server as usize;
    match first
        .result
        .as_ref()
        .map(|r| r.as_ref().map(|r| stored(r.kind)))
    {
        // An item exists: "not stored" is the answer, nothing changed.
        Some(Ok(Some(false))) => WriteStage::Done,
        Some(Ok(Some(true))) => {
            let primary = replicas.primary();
            if w.servers[primary].health().serves(&route) {
                attempt(f, slot, 0, vivify_pending)
            } else {
                // The primary went down meanwhile: the backup's item is the
                // key's, and the primary missed it.
                w.servers[primary].health().missed.record(&route);
                WriteStage::Done
            }
        }
        // Failed, or refused for another reason: the backup may hold
        // anything now. It misses the key; the primary takes the write.
        _ => {
            w.servers[backup].health().missed.record(&route);
            attempt(f, slot, 0, vivify_pending)
        }
    }
}

/// The backup a create-if-absent write stored on first, if it did.
fn created_ahead(slot: &Slot) -> Option<usize> {
    slot.parts.iter().find_map(|p| match &p.result {
        Some(Ok(r)) if p.role == Role::Create && stored(r.kind) == Some(true) => {
            Some(p.server as usize)
        }
        _ => None,
    })
}

/// Whether the write overwrites the item whatever it was (a plain set): then
/// the backup can be written at the same time as the primary, since its
/// state does not depend on the primary's answer.
fn blind_overwrite(req: &Request) -> bool {
    match req.command {
        Command::Set => true,
        Command::MetaSet => matches!(req.meta.mode, 0 | b'S') && !req.meta.cas,
        _ => false,
    }
}

/// Sends the write to the first serving replica at or after `from`
/// (`vivify_pending`: without its `N`, see `WriteStage::Sent`).
fn attempt(
    f: &Flow<'_, impl Inbox, impl Pool>,
    slot: &mut Slot,
    from: usize,
    vivify_pending: bool,
) -> WriteStage {
    let (w, req) = (f.w, &f.req);
    let Some(replicas) = slot.replicas else {
        return WriteStage::Done;
    };
    let frame = slot.frame.clone();
    let wire_key = req.key.of(&frame);
    let route = super::route_key(&frame, req);
    let key: &[u8] = &route;
    let target = super::serving(w, &replicas, key, from, |skipped| {
        // The write goes past this replica: it misses the key.
        w.servers[skipped].health().missed.record(key);
    });
    let Some((tier, server)) = target else {
        if slot.parts.is_empty() {
            w.stats.server_errors.incr();
            slot.local = Some(Local::Static(if req.noreply { b"" } else { NO_SERVER }));
        }
        return WriteStage::Done;
    };
    if tier > 0 {
        w.stats.failovers.incr();
    }
    let value = has_value(req).then(|| frame.slice(req.value.start as usize..req.value.end()));
    let reply = f.reply_to(slot.parts.len());
    let wire = super::meta_wire(req, replicas.len() > 1);
    let expect = if req.command.is_meta() {
        wire.expect
    } else {
        expect_of(req.command)
    };
    // A CAS token (`ha::cas`) becomes this replica's own unique, or one no
    // item has if another replica or process issued it.
    let mut req_here = *req;
    let stamp = w.servers[server].health().stamp();
    req_here.cas = super::cas::unique_for(req.cas, stamp);
    let req_here = &req_here;
    let mut wire = wire;
    wire.cas = super::meta_cas_token(&frame, req).map(|t| super::cas::unique_for(t, stamp));
    wire.strip_n = vivify_pending;
    let queued = w.servers[server].send_for_key(
        key,
        expect,
        reply,
        |b| compose_line(b, &frame, req_here, req.command, wire_key, wire),
        value,
    );
    slot.push_part(Part::new(server), queued);
    if tier == 0 && blind_overwrite(req) {
        // Copy it to the backups now, in parallel: the client's reply then
        // costs one round trip, not two.
        for next in 1..replicas.len() {
            if let Some(b) = replicas.get(next) {
                send_mirror(
                    f,
                    slot,
                    &route,
                    MirrorTo {
                        server: b,
                        plan: MirrorPlan::Set,
                        number: None,
                    },
                );
            }
        }
    }
    WriteStage::Sent {
        tier: tier as u8,
        vivify_pending,
    }
}

/// The replica at `tier` answered or failed: mirror, or move to the next
/// replica.
fn after_answer(
    f: &Flow<'_, impl Inbox, impl Pool>,
    slot: &mut Slot,
    tier: usize,
    vivify_pending: bool,
) -> WriteStage {
    let (w, req) = (f.w, &f.req);
    let Some(replicas) = slot.replicas else {
        return WriteStage::Done;
    };
    let frame = slot.frame.clone();
    let route = super::route_key(&frame, req);
    let main = slot.main_part().unwrap_or(0);
    let mirrored_in_parallel = slot.mirrored_in_parallel();
    match slot.result(main) {
        // The primary does not have the item but a backup may (the
        // primary restarted or had the key invalidated): like a read, the
        // write falls back to the backup, which applies it exactly once
        // (the primary did not), and the client gets the backup's answer.
        Some(Ok(reply))
            if tier == 0
                && !mirrored_in_parallel
                && w.miss_fallback
                && is_miss(req, reply.kind) =>
        {
            let key = KeyRoute {
                replicas: &replicas,
                route: &route,
            };
            fall_back_from_a_miss(f, slot, key, vivify_pending)
        }
        Some(Ok(reply)) if vivify_pending && is_miss(req, reply.kind) => {
            // No replica had the item: now create it, from the first tier
            // that serves the key, and copy it as usual.
            attempt(f, slot, 0, false)
        }
        Some(Ok(reply)) => {
            if tier > 0 && !is_miss(req, reply.kind) {
                bypassed(w, &replicas, tier, &route);
            }
            mirror_after(
                f,
                slot,
                tier,
                KeyRoute {
                    replicas: &replicas,
                    route: &route,
                },
            )
        }
        Some(Err(e)) => {
            let server = slot.parts[main].server as usize;
            w.servers[server]
                .health()
                .missed
                .record_failed(&route, e.sent);
            if tier == 0 && created_ahead(slot).is_some() {
                // The backup stored it already (exactly once): its answer
                // is the client's (see `answer`).
                w.stats.failovers.incr();
                return WriteStage::Done;
            }
            if mirrored_in_parallel {
                // The backups already have it, exactly once: their answer
                // is the client's (see `answer`).
                w.stats.failovers.incr();
                return settle_mirrors(f, slot, false);
            }
            attempt(f, slot, tier + 1, vivify_pending)
        }
        None => WriteStage::Done,
    }
}

/// The primary answered a write that it holds no item (see `after_answer`):
/// the write moves to the backup. When no backup can take it, an
/// autovivifying request creates the item on the primary; any other keeps
/// the primary's answer, whose mirror rule then applies.
fn fall_back_from_a_miss(
    f: &Flow<'_, impl Inbox, impl Pool>,
    slot: &mut Slot,
    key: KeyRoute<'_>,
    vivify_pending: bool,
) -> WriteStage {
    let next = attempt(f, slot, 1, vivify_pending);
    let fell_back = slot.parts.iter().filter(|p| p.role == Role::Main).count() > 1;
    if fell_back {
        return next;
    }
    if vivify_pending {
        // No backup could be asked: create it on the primary.
        attempt(f, slot, 0, false)
    } else {
        // No backup could take it: the primary's answer stands, and its
        // mirror rule (the backups' copies are deleted) applies.
        slot.local = None;
        mirror_after(f, slot, 0, key)
    }
}

/// A write changed the item at `tier` and not on the tiers before it: they
/// failed or were down (and were recorded as having missed the key then),
/// or answered that they had no item (a restarted primary: the write fell
/// back). Record them now, before the client is answered: a copy of the
/// item as it was before this write (a read repair or a resync that read
/// this tier a moment ago) may be landing on them, and the prober's delete,
/// which comes after this record, removes it before they serve the key
/// again. Repairs not yet sent see the record and are dropped.
fn bypassed(w: &Cluster<impl Pool>, replicas: &crate::router::Replicas, tier: usize, route: &[u8]) {
    for before in 0..tier {
        if let Some(server) = replicas.get(before) {
            w.servers[server].health().missed.record(route);
        }
    }
}

/// The replica at `tier` answered: bring the tiers after it to its state
/// (the client's reply waits for them, so a write it makes next can never
/// be overtaken by this one's copies).
fn mirror_after(
    f: &Flow<'_, impl Inbox, impl Pool>,
    slot: &mut Slot,
    tier: usize,
    key: KeyRoute<'_>,
) -> WriteStage {
    let (w, req) = (f.w, &f.req);
    let KeyRoute { replicas, route } = key;
    let main = slot.main_part().unwrap_or(0);
    let mirrored_in_parallel = slot.mirrored_in_parallel();
    let Some(Ok(reply)) = slot.result(main) else {
        return WriteStage::Done;
    };
    let (kind, number) = outcome(req, reply);
    if req.command == Command::MetaArith
        && number.is_none()
        && mirror_plan(req.command, 0, kind) == MirrorPlan::Same
    {
        // The new value is unknown (a quiet `ma ... N` that
        // incremented): a copy could not be checked, so the
        // backups must not serve the key until it is invalidated.
        for next in tier + 1..replicas.len() {
            if let Some(server) = replicas.get(next) {
                w.servers[server].health().missed.record(route);
            }
        }
        return WriteStage::Done;
    }
    if mirrored_in_parallel {
        // The primary did not store it: the copies must not stand.
        let refused = !matches!(
            kind,
            ResponseKind::Stored | ResponseKind::Meta(MetaStatus::Hd)
        );
        return settle_mirrors(f, slot, refused);
    }
    // Bring the tiers after the one that answered to its state; the
    // client's reply waits for them, so a write it makes next can
    // never be overtaken by this one's copies.
    let plan = mirror_plan(req.command, req.meta.mode, kind);
    let ahead = created_ahead(slot);
    if ahead.is_some() && stored(kind) != Some(true) {
        // The primary holds an item the backup lacked (it was invalidated
        // or restarted): the item the backup just created must not stand.
        if let Some(b) = ahead {
            w.servers[b].health().missed.record(route);
        }
    }
    for next in tier + 1..replicas.len() {
        if let Some(server) = replicas.get(next) {
            if Some(server) == ahead {
                continue; // it stored this very item already
            }
            send_mirror(
                f,
                slot,
                route,
                MirrorTo {
                    server,
                    plan,
                    number,
                },
            );
        }
    }
    if slot.is_waiting() {
        WriteStage::Mirror
    } else {
        WriteStage::Done
    }
}

/// What the replica that took a write answered, as its copies follow it:
/// the kind of answer (a quiet meta write whose reply memcached suppressed
/// succeeded) and, for `incr`/`decr`/`ma`, the number it reached.
fn outcome(req: &Request, reply: &crate::backend::BackendReply) -> (ResponseKind, Option<u64>) {
    let number = match reply.kind {
        ResponseKind::Number(n) => Some(n),
        ResponseKind::Meta(MetaStatus::Value) if req.command == Command::MetaArith => {
            super::meta_number(reply)
        }
        _ => None,
    };
    let kind = match reply.kind {
        ResponseKind::Meta(MetaStatus::Mn) => ResponseKind::Meta(MetaStatus::Hd),
        k => k,
    };
    (kind, number)
}

/// Whether the primary's answer means it does not hold the item, for a
/// write that would have applied to one the backup may hold.
fn is_miss(req: &Request, kind: ResponseKind) -> bool {
    use MetaStatus as M;
    use ResponseKind as R;
    match (req.command, kind) {
        (
            Command::Incr | Command::Decr | Command::Touch | Command::Delete | Command::Cas,
            R::NotFound,
        ) => true,
        (Command::Append | Command::Prepend | Command::Replace, R::NotStored) => true,
        (Command::MetaDelete | Command::MetaArith, R::Meta(M::Nf)) => true,
        (Command::MetaSet, R::Meta(M::Nf)) => true,
        (Command::MetaSet, R::Meta(M::Ns)) => matches!(req.meta.mode, b'R' | b'A' | b'P'),
        _ => false,
    }
}

/// The copies on the backups are in: a backup that failed or answered
/// otherwise than the primary is recorded as having missed the key, so it
/// never serves it until the key is invalidated there.
fn after_mirrors(f: &Flow<'_, impl Inbox, impl Pool>, slot: &mut Slot) -> WriteStage {
    match settle_mirrors(f, slot, false) {
        WriteStage::Done if f.req.command == Command::Touch => restore_expired_copies(f, slot),
        next => next,
    }
}

/// The backups a `touch` copy found without the item while the primary
/// took the touch.
fn expired_copies(slot: &Slot) -> SmallVec<[usize; 2]> {
    let touched = slot
        .main_part()
        .and_then(|m| slot.result(m))
        .is_some_and(|r| matches!(r, Ok(r) if r.kind == ResponseKind::Touched));
    if !touched {
        return SmallVec::new();
    }
    slot.parts
        .iter()
        .filter(|p| matches!(p.role, Role::Mirror(_)))
        .filter(|p| matches!(&p.result, Some(Ok(r)) if r.kind == ResponseKind::NotFound))
        .map(|p| p.server as usize)
        .collect()
}

/// A `touch` the primary took found no item on a backup: that copy expired
/// a moment before the primary's (each memcached's clock ticks on its own,
/// in whole seconds). Without a copy the item, now given a longer life,
/// would live on the primary alone. So it is read from the primary and
/// added to those backups (`add`: a value written meanwhile wins) with the
/// touch's TTL, and the reply waits for it, as a `gat`'s does
/// (`ha::read`). Two more round trips, only then.
fn restore_expired_copies(f: &Flow<'_, impl Inbox, impl Pool>, slot: &mut Slot) -> WriteStage {
    let (w, req) = (f.w, &f.req);
    let (Some(primary), false) = (
        slot.main_part().map(|m| slot.parts[m].server as usize),
        expired_copies(slot).is_empty(),
    ) else {
        return WriteStage::Done;
    };
    let frame = slot.frame.clone();
    let key = req.key.of(&frame);
    let queued = w.servers[primary].send_for_key(
        key,
        Expect::Retrieval,
        f.reply_to(slot.parts.len()),
        |b| compose::retrieval(b, Command::Get, 0, [key]),
        None,
    );
    slot.push_part(Part::with_role(primary, Role::TtlFetch), queued);
    if slot.is_waiting() {
        WriteStage::TtlFetch
    } else {
        after_ttl_fetch(f, slot)
    }
}

/// The primary's item is in (or it has none any more): added to each
/// backup that had none.
fn after_ttl_fetch(f: &Flow<'_, impl Inbox, impl Pool>, slot: &mut Slot) -> WriteStage {
    let req = &f.req;
    let frame = slot.frame.clone();
    let key = req.key.of(&frame);
    let fetched = slot
        .parts
        .iter()
        .rfind(|p| p.role == Role::TtlFetch)
        .and_then(|p| match &p.result {
            Some(Ok(r)) if matches!(r.kind, ResponseKind::Values { .. }) => Some(r.bytes.clone()),
            _ => None,
        });
    let Some(bytes) = fetched else {
        return WriteStage::Done;
    };
    let Some((flags, value)) = memrelay_protocol::response::ValueBlocks::new(&bytes)
        .next()
        .filter(|b| b.header.key == key)
        .map(|b| (b.header.flags, bytes.slice(b.data())))
    else {
        return WriteStage::Done;
    };
    for server in expired_copies(slot) {
        let to = (server, Role::TtlCopy { key: 0 });
        super::push_ttl_copy(f, slot, to, key, (flags, req.exptime), &value);
    }
    if slot.is_waiting() {
        WriteStage::TtlCopy
    } else {
        after_ttl_copies(f, slot)
    }
}

/// The copies are in: a backup that failed one is recorded as having
/// missed the key (it holds no item; a stale one could only come from a
/// copy that landed late).
fn after_ttl_copies(f: &Flow<'_, impl Inbox, impl Pool>, slot: &mut Slot) -> WriteStage {
    let (w, req) = (f.w, &f.req);
    let route = super::route_key(&slot.frame, req);
    for p in slot.parts.iter_mut() {
        if !matches!(p.role, Role::TtlCopy { .. }) || std::mem::replace(&mut p.settled, true) {
            continue;
        }
        let applied = matches!(&p.result, Some(Ok(r)) if r.kind != ResponseKind::Error);
        if !applied {
            w.stats.mirror_failures.incr();
            w.servers[p.server as usize]
                .health()
                .missed
                .record_failed(&route, super::given_up(&p.result));
        }
    }
    WriteStage::Done
}

/// Judges every mirror not yet judged. A backup that answered but ended in
/// another state than the primary (or took a copy the primary refused) has
/// its copy deleted before the client is answered, so it holds the
/// primary's item or nothing; one that failed is recorded as having missed
/// the key.
fn settle_mirrors(
    f: &Flow<'_, impl Inbox, impl Pool>,
    slot: &mut Slot,
    primary_refused: bool,
) -> WriteStage {
    let (w, req) = (f.w, &f.req);
    let route = super::route_key(&slot.frame, req);
    let mut compensate: SmallVec<[usize; 2]> = SmallVec::new();
    for p in slot.parts.iter_mut().filter(|p| !p.settled) {
        match p.role {
            Role::Mirror(number) => {
                p.settled = true;
                let good = match (&p.result, number) {
                    (Some(Ok(_)), _) if primary_refused => false,
                    (Some(Ok(r)), _) if r.kind == ResponseKind::Error => false,
                    (Some(Ok(r)), Some(n)) => match r.kind {
                        ResponseKind::Number(m) => m == n,
                        ResponseKind::Meta(MetaStatus::Value) => super::meta_number(r) == Some(n),
                        ResponseKind::NotFound | ResponseKind::Meta(MetaStatus::Nf) => true,
                        _ => false,
                    },
                    (Some(Ok(_)), None) => true,
                    _ => false,
                };
                if good {
                    continue;
                }
                w.stats.mirror_failures.incr();
                match &p.result {
                    Some(Ok(r)) => {
                        // It answered, and ended otherwise than the
                        // primary (another number, or a copy the primary
                        // refused). An error reply is a refusal: a failure
                        // only.
                        if r.kind != ResponseKind::Error {
                            w.stats.mirror_mismatches.incr();
                        }
                        compensate.push(p.server as usize)
                    }
                    _ => w.servers[p.server as usize]
                        .health()
                        .missed
                        .record_failed(&route, super::given_up(&p.result)),
                }
            }
            Role::Compensate => {
                p.settled = true;
                if !matches!(&p.result, Some(Ok(r)) if r.kind != ResponseKind::Error) {
                    w.servers[p.server as usize]
                        .health()
                        .missed
                        .record_failed(&route, super::given_up(&p.result));
                }
            }
            _ => {}
        }
    }
    for server in compensate {
        let reply = f.reply_to(slot.parts.len());
        let key: &[u8] = &route;
        let pool = &w.servers[server];
        let queued = pool.send_for_key(
            key,
            super::delete_expect(key),
            reply,
            |b| super::write_delete(b, key),
            None,
        );
        slot.push_part(Part::with_role(server, Role::Compensate), queued);
    }
    if slot.is_waiting() {
        WriteStage::Mirror
    } else if slot
        .parts
        .iter()
        .any(|p| p.role == Role::Compensate && !p.settled)
    {
        // A compensation failed at once: settle it now.
        settle_mirrors(f, slot, false)
    } else {
        WriteStage::Done
    }
}

/// The reply the client gets: the answer of the replica that took the write
/// (for a set copied in parallel whose primary failed, the backup's), and
/// whether it came from a mirror. A write that fell back from a primary
/// without the item to a backup that then failed gets the primary's answer
/// ("not found"): the fall-back was a second chance, and the failed backup
/// is recorded as having missed the key, so it will hold no item either.
fn answer(slot: &Slot) -> Option<(&crate::backend::BackendResult, bool)> {
    let Some(main) = slot.main_part() else {
        // A create-if-absent write the first backup answered alone.
        let first = slot.parts.first().filter(|p| p.role == Role::Create)?;
        return Some((first.result.as_ref()?, false));
    };
    let main_result = slot.result(main)?;
    if main_result.is_err() {
        if let Some(r) = slot.parts[..main]
            .iter()
            .filter(|p| matches!(p.role, Role::Main | Role::Create))
            .find_map(|p| p.result.as_ref().filter(|r| r.is_ok()))
        {
            return Some((r, false));
        }
        if let Some(r) = slot
            .parts
            .iter()
            .filter(|p| matches!(p.role, Role::Mirror(_)))
            .find_map(|p| p.result.as_ref().filter(|r| r.is_ok()))
        {
            return Some((r, true));
        }
    }
    Some((main_result, false))
}

/// The client's reply to a write: the answer of the replica that took it
/// last (see `answer`), nothing with `noreply`.
pub(crate) fn render(w: &Cluster<impl Pool>, slot: &Slot, req: &Request, out: &mut OutQueue) {
    if req.noreply {
        return;
    }
    match answer(slot) {
        Some((Ok(reply), from_mirror)) => {
            if reply.kind == ResponseKind::Error {
                w.stats.server_errors.incr();
            }
            if req.command.is_meta() {
                if let Some(b) = meta_reply_bytes(slot, req, reply, from_mirror) {
                    let server = super::server_of(slot, reply);
                    out.put_bytes(super::meta_read::with_cas_token(w, slot, req, server, b));
                }
            } else {
                out.put_bytes(reply.bytes.clone());
            }
        }
        Some((Err(e), _)) => {
            w.stats.server_errors.incr();
            out.put_slice(e.reply())
        }
        None => out.put_slice(NO_SERVER),
    }
}

/// A meta write's reply as the client must see it.
fn meta_reply_bytes(
    slot: &Slot,
    req: &Request,
    reply: &crate::backend::BackendReply,
    from_mirror: bool,
) -> Option<bytes::Bytes> {
    if from_mirror {
        // A parallel copy: sent without q, so apply quiet mode here.
        if req.meta.quiet && reply.kind == ResponseKind::Meta(MetaStatus::Hd) {
            return None;
        }
        return Some(reply.bytes.clone());
    }
    let mirrored = slot.replicas.map(|r| r.len() > 1).unwrap_or(false);
    super::meta_client_reply(req, super::meta_wire(req, mirrored), reply)
}

/// Where a write's key lives: its replicas and the key it is routed by.
#[derive(Clone, Copy)]
struct KeyRoute<'a> {
    replicas: &'a crate::router::Replicas,
    route: &'a bytes::Bytes,
}

/// One copy of a write to make on a backup.
#[derive(Debug, Clone, Copy)]
struct MirrorTo {
    server: usize,
    plan: MirrorPlan,
    /// An `incr`/`decr` (or `ma`) copy must reach this number (see
    /// `Role::Mirror`).
    number: Option<u64>,
}

/// Sends `to.plan` to one backup as part of the slot.
fn send_mirror(
    f: &Flow<'_, impl Inbox, impl Pool>,
    slot: &mut Slot,
    route: &bytes::Bytes,
    to: MirrorTo,
) {
    let (w, req) = (f.w, &f.req);
    let MirrorTo {
        server,
        plan,
        number,
    } = to;
    if plan == MirrorPlan::Nothing {
        return;
    }
    let key: &[u8] = route;
    if !w.servers[server].health().serves(key) {
        // Down or already stale for this key: it misses this write too.
        w.servers[server].health().missed.record(key);
        return;
    }
    w.stats.mirrors.incr();
    let frame = slot.frame.clone();
    let reply = f.reply_to(slot.parts.len());
    let pool = &w.servers[server];
    let queued = match plan {
        MirrorPlan::Nothing => return,
        MirrorPlan::Delete => pool.send_for_key(
            key,
            super::delete_expect(key),
            reply,
            |b| super::write_delete(b, key),
            None,
        ),
        _ if req.command.is_meta() => {
            // Sent before the primary answered: a plain set in parallel.
            let parallel = slot
                .parts
                .iter()
                .all(|p| p.role == Role::Main && p.result.is_none());
            send_meta_mirror(&**pool, req, &frame, key, reply, to, parallel)
        }
        MirrorPlan::Set => {
            let value = frame.slice(req.value.start as usize..req.value.end());
            let len = value.len();
            pool.send_for_key(
                key,
                Expect::Storage,
                reply,
                |b| compose::storage_line(b, Command::Set, key, req.flags, req.exptime, len, 0),
                Some(value),
            )
        }
        MirrorPlan::Same => {
            let value =
                has_value(req).then(|| frame.slice(req.value.start as usize..req.value.end()));
            pool.send_for_key(
                key,
                expect_of(req.command),
                reply,
                |b| {
                    compose_line(
                        b,
                        &frame,
                        req,
                        req.command,
                        key,
                        super::meta_wire(req, false),
                    )
                },
                value,
            )
        }
    };
    slot.push_part(Part::with_role(server, Role::Mirror(number)), queued);
}

/// Sends a meta write's copy `to` (see `meta_copy_keeps`; `parallel`: it
/// goes before the primary answered) through `pool`.
fn send_meta_mirror(
    pool: &impl Pool,
    req: &Request,
    frame: &bytes::Bytes,
    key: &[u8],
    reply: crate::backend::ReplyTo,
    to: MirrorTo,
    parallel: bool,
) -> Result<(), crate::backend::BackendError> {
    let MirrorTo { plan, number, .. } = to;
    let keep = meta_copy_keeps(parallel, plan);
    // An ma copy reports its new value, to be checked against the
    // primary's.
    let extra: &[u8] = if req.command == Command::MetaArith && number.is_some() {
        b" v"
    } else {
        b""
    };
    let len = (req.command == Command::MetaSet).then_some(req.value.len as usize);
    let value = len.map(|_| frame.slice(req.value.start as usize..req.value.end()));
    let flags = req.meta.flags.of(frame);
    let wire_key = req.key.of(frame);
    pool.send_for_key(
        key,
        Expect::Meta,
        reply,
        |b| compose::meta_line_filtered(b, req.command, wire_key, len, flags, keep, extra),
        value,
    )
}

/// Which of a meta write's flags its copy on a backup keeps: the same
/// command, without what only makes sense on the primary (C compares the
/// primary's CAS, I goes with it; q, O, k and return flags store nothing),
/// and for a set-like result without the mode: the primary now holds
/// exactly this item. A plain set copied in parallel may become the
/// client's reply (if the primary fails): it keeps every flag but q.
/// Otherwise only what changes the stored item is kept.
fn meta_copy_keeps(parallel: bool, plan: MirrorPlan) -> impl Fn(&[u8]) -> bool {
    let drop_mode = plan == MirrorPlan::Set;
    move |t: &[u8]| match t[0] {
        b'q' => false,
        _ if parallel => true,
        b'C' | b'I' | b'O' | b'k' | b'c' | b's' | b't' | b'f' | b'v' | b'h' | b'l' => false,
        b'M' => !drop_mode,
        _ => true,
    }
}

/// Whether the request carries a data block.
fn has_value(req: &Request) -> bool {
    req.command.is_storage() || req.command == Command::MetaSet
}

/// The reply when no replica of a key can take a write.
pub(crate) const NO_SERVER: &[u8] = b"SERVER_ERROR no server is available for this key\r\n";

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
