//! Reads: `get gets gat gats`, over one or many keys.
//!
//! Round one asks each key's first serving replica (its primary, unless the
//! primary is down or stale for the key), one request per server. Round two,
//! only when needed, asks the backup for the keys that missed or failed in
//! round one, with `mg` so the item's flags, remaining TTL (and CAS for
//! `gets`) come back; backup hits are returned to the client and written
//! back to the primary with `add` semantics, so a value written meanwhile
//! always wins. A key no replica can serve is a miss: the client always gets
//! its `END`.

use std::iter::Peekable;

use memrelay_protocol::response::{ValueBlock, ValueBlocks};
use memrelay_protocol::{compose, meta_flags, Command, Expect, MetaStatus, Request, ResponseKind};
use smallvec::SmallVec;

use super::flow::{Flow, State};
use super::slot::{Local, Part, Role, Slot};
use super::{Cluster, Inbox, Pool};
use crate::backend::Failure;
use crate::net::outqueue::OutQueue;

/// No server can serve this key (in `key_parts`).
const NO_PART: u16 = u16::MAX;

/// A read's own state, in its slot (`State::Read`) from its start to its
/// reply.
#[derive(Debug)]
pub(crate) struct Read {
    /// Reads over several servers: the first-round part of each key.
    /// Empty when all keys went to `parts[0]`. The steps walk the keys by
    /// it, and so does the reply: it lives as long as the read.
    key_parts: Vec<u16>,
    stage: ReadStage,
}

/// Where a read stands. Each step returns the next (`advance`); the
/// parts of each round carry what it asked for (`Role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadStage {
    /// Round one: primaries, or backups for keys whose primary cannot
    /// serve them.
    RoundOne,
    /// Round two: lookups on backups for keys that missed, and a TTL
    /// change copied to the later tiers.
    Fallback,
    /// Backup hits being written back to primaries, and expired copies
    /// added again with a TTL change.
    Repair,
    /// Nothing more to send.
    Done,
}

impl Read {
    pub(crate) fn is_done(&self) -> bool {
        self.stage == ReadStage::Done
    }
}

/// All of a read's parts are in: its next step.
pub(crate) fn advance(f: &Flow<'_, impl Inbox, impl Pool>, slot: &mut Slot) {
    let State::Read(read) = &slot.state else {
        return;
    };
    let next = match read.stage {
        ReadStage::RoundOne => after_round_one(f, slot),
        ReadStage::Fallback => after_fallback(f, slot),
        ReadStage::Repair => after_repair(f.w, slot, &f.req),
        ReadStage::Done => ReadStage::Done,
    };
    if let State::Read(read) = &mut slot.state {
        read.stage = next;
    }
}

/// The first-round part of each key (see `Read::key_parts`).
fn key_parts(slot: &Slot) -> &[u16] {
    match &slot.state {
        State::Read(read) => &read.key_parts,
        _ => &[],
    }
}

/// The first-round part key `i` was read from.
fn part_of_key(slot: &Slot, i: usize) -> usize {
    key_parts(slot).get(i).map(|&p| p as usize).unwrap_or(0)
}

/// Round one.
pub(crate) fn start(f: &Flow<'_, impl Inbox, impl Pool>, slot: &mut Slot) {
    let (w, req) = (f.w, &f.req);
    let frame = slot.frame.clone();
    let (cmd, exptime) = (req.command, req.exptime);
    if req.nkeys == 0 {
        slot.local = Some(Local::Static(b"END\r\n"));
        return;
    }
    slot.state = State::Read(Read {
        key_parts: Vec::new(),
        stage: ReadStage::RoundOne,
    });
    if req.nkeys == 1 {
        let key = req.key.of(&frame);
        let replicas = w.router.replicas(key);
        slot.replicas = Some(replicas);
        let Some((tier, server)) =
            super::serving(w, &replicas, key, 0, |s| skipped_ttl_change(w, req, s, key))
        else {
            return;
        };
        if tier > 0 {
            w.stats.failovers.incr();
        }
        let queued = w.servers[server].send(
            Expect::Retrieval,
            f.reply_to(0),
            |b| compose::retrieval(b, cmd, exptime, [key]),
            None,
        );
        return slot.push_part(Part::new(server), queued);
    }
    // Several keys: each to its serving replica, grouped by server.
    let mut servers: SmallVec<[usize; 4]> = SmallVec::new();
    let mut key_parts = Vec::with_capacity(req.nkeys as usize);
    let mut unserved = false;
    for key in req.keys(&frame) {
        let replicas = w.router.replicas(key);
        let Some((tier, s)) =
            super::serving(w, &replicas, key, 0, |s| skipped_ttl_change(w, req, s, key))
        else {
            key_parts.push(NO_PART);
            unserved = true;
            continue;
        };
        if tier > 0 {
            w.stats.failovers.incr();
        }
        let p = servers.iter().position(|&x| x == s).unwrap_or_else(|| {
            servers.push(s);
            servers.len() - 1
        });
        key_parts.push(p as u16);
    }
    for (p, &server) in servers.iter().enumerate() {
        let queued = if servers.len() == 1 && !unserved {
            w.servers[server].send(
                Expect::Retrieval,
                f.reply_to(p),
                |b| compose::retrieval(b, cmd, exptime, req.keys(&frame)),
                None,
            )
        } else {
            let keys = req
                .keys(&frame)
                .zip(key_parts.iter())
                .filter(|(_, &kp)| kp as usize == p)
                .map(|(k, _)| k);
            w.servers[server].send(
                Expect::Retrieval,
                f.reply_to(p),
                |b| compose::retrieval(b, cmd, exptime, keys),
                None,
            )
        };
        slot.push_part(Part::new(server), queued);
    }
    if servers.len() > 1 || unserved {
        slot.state = State::Read(Read {
            key_parts,
            stage: ReadStage::RoundOne,
        });
    }
}

/// Whether the read changes the TTL of what it finds (`gat`, `gats`,
/// `mg ... T`): then every replica must get the change, like a write's.
pub(crate) fn changes_ttl(req: &Request) -> bool {
    match req.command {
        Command::Gat | Command::Gats => true,
        Command::MetaGet => req.meta.touch.is_some(),
        _ => false,
    }
}

/// A TTL-changing read went past `server` (down, stale for the key, or
/// failed): its copy keeps the old TTL, so it is recorded as having missed
/// the key, as for a write.
pub(super) fn skipped_ttl_change(w: &Cluster<impl Pool>, req: &Request, server: usize, key: &[u8]) {
    if changes_ttl(req) {
        w.servers[server].health().missed.record(key);
    }
}

/// A TTL-changing read found these keys (key number, route key, server
/// that answered): the tiers after that server get the same TTL, so the
/// item does not outlive (or expire before) its primary's after a
/// failover. A tier that cannot take it now is recorded as having missed
/// the key. The client's reply waits for these, as for a write's copies.
pub(super) fn mirror_ttl_changes(
    f: &Flow<'_, impl Inbox, impl Pool>,
    slot: &mut Slot,
    found: &[(u32, bytes::Bytes, usize)],
) {
    let (w, req) = (f.w, &f.req);
    let meta_flags = req.meta.touch.map(|ttl| {
        let mut f = format!("T{ttl}").into_bytes();
        if req.meta.base64 {
            f.extend_from_slice(b" b");
        }
        f
    });
    let frame = slot.frame.clone();
    for (i, key, server) in found {
        let replicas = w.router.replicas(key);
        let Some(tier) = replicas.iter().position(|s| s == *server) else {
            continue;
        };
        for next in tier + 1..replicas.len() {
            let Some(b) = replicas.get(next) else {
                continue;
            };
            if !w.servers[b].health().serves(key) {
                w.servers[b].health().missed.record(key);
                continue;
            }
            w.stats.mirrors.incr();
            let part = slot.parts.len();
            let queued = match &meta_flags {
                Some(flags) => {
                    let wire_key = req.key.of(&frame);
                    w.servers[b].send_for_key(
                        key,
                        Expect::Meta,
                        f.reply_to(part),
                        |out| compose::meta_line(out, Command::MetaGet, wire_key, None, flags),
                        None,
                    )
                }
                None => w.servers[b].send_for_key(
                    key,
                    Expect::Touch,
                    f.reply_to(part),
                    |out| compose::touch(out, key, req.exptime),
                    None,
                ),
            };
            slot.push_part(Part::with_role(b, Role::Touch { key: *i }), queued);
        }
    }
}

/// The TTL copies are in: a tier that failed or refused one is recorded as
/// having missed the key. Returns the (key number, server) of the `touch`
/// copies that found no item there.
pub(super) fn settle_ttl_changes(
    w: &Cluster<impl Pool>,
    slot: &mut Slot,
    req: &Request,
) -> SmallVec<[(u32, u16); 2]> {
    let frame = slot.frame.clone();
    let mut absent = SmallVec::new();
    for p in slot.parts.iter_mut() {
        let Role::Touch { key } = p.role else {
            continue;
        };
        if std::mem::replace(&mut p.settled, true) {
            continue;
        }
        if matches!(&p.result, Some(Ok(r)) if r.kind == ResponseKind::NotFound) {
            absent.push((key, p.server));
            continue;
        }
        let applied = matches!(&p.result, Some(Ok(r)) if r.kind != ResponseKind::Error);
        if applied {
            continue;
        }
        w.stats.mirror_failures.incr();
        let route = if req.command.is_meta() {
            super::route_key(&frame, req)
        } else {
            match req.keys(&frame).nth(key as usize) {
                Some(k) => frame.slice_ref(k),
                None => continue,
            }
        };
        w.servers[p.server as usize]
            .health()
            .missed
            .record_failed(&route, super::given_up(&p.result));
    }
    absent
}

/// A `gat`'s TTL copy found no item on a later tier while the replica that
/// answered had it: that tier's copy expired a moment earlier (each
/// memcached's clock ticks on its own, in whole seconds). Without a copy the
/// item, now given a longer life, would live on one replica only; so it is
/// added there (`add`: a value written meanwhile wins) with the new TTL, and
/// the reply waits for it. Returns whether it sent any.
fn copy_expired_copies(
    f: &Flow<'_, impl Inbox, impl Pool>,
    slot: &mut Slot,
    absent: &[(u32, u16)],
) -> bool {
    let req = &f.req;
    if absent.is_empty() {
        return false;
    }
    let frame = slot.frame.clone();
    // (key number, flags, value as a slice of the reply that carried it)
    let mut found: SmallVec<[(u32, u32, bytes::Bytes); 2]> = SmallVec::new();
    walk(slot, req, |i, _key, p, hit| {
        let (Some(block), Some(Some(Ok(reply)))) = (hit, slot.parts.get(p).map(|p| &p.result))
        else {
            return;
        };
        if absent.iter().any(|(k, _)| *k as usize == i) {
            found.push((
                i as u32,
                block.header.flags,
                reply.bytes.slice(block.data()),
            ));
        }
    });
    let mut sent = false;
    for (i, flags, value) in found {
        let Some(key) = req.keys(&frame).nth(i as usize) else {
            continue;
        };
        for &(k, server) in absent.iter().filter(|(k, _)| *k == i) {
            let to = (server as usize, Role::TtlCopy { key: k });
            super::push_ttl_copy(f, slot, to, key, (flags, req.exptime), &value);
            sent = true;
        }
    }
    sent
}

/// A server whose reply holds VALUE blocks that answer no requested key (a
/// key nobody asked for, a second block for one key) is broken: it is
/// counted as failed and its connections are closed. The blocks themselves
/// never reach the client (`walk` only takes blocks that match a key).
fn drop_misbehaving_servers(w: &Cluster<impl Pool>, slot: &Slot, req: &Request) {
    let round_one = slot
        .parts
        .iter()
        .take_while(|p| p.role == Role::Main)
        .count();
    let mut matched: SmallVec<[u32; 4]> = SmallVec::from_elem(0, round_one);
    walk(slot, req, |_, _, p, hit| {
        if hit.is_some() {
            if let Some(m) = matched.get_mut(p) {
                *m += 1;
            }
        }
    });
    for (p, part) in slot.parts[..round_one].iter().enumerate() {
        if let Some(Ok(r)) = &part.result {
            if let ResponseKind::Values { hits } = r.kind {
                if hits > matched[p] {
                    w.servers[part.server as usize].poison("VALUE for a key not asked for");
                }
            }
        }
    }
}

/// Walks the keys in request order with their round-one outcome: the part
/// that served them and the VALUE block, if it was a hit.
fn walk<'a>(
    slot: &'a Slot,
    req: &Request,
    mut f: impl FnMut(usize, &'a [u8], usize, Option<ValueBlock<'a>>),
) {
    let round_one = slot
        .parts
        .iter()
        .take_while(|p| p.role == Role::Main)
        .count();
    let mut cursors: SmallVec<[Option<Peekable<ValueBlocks<'a>>>; 4]> = slot.parts[..round_one]
        .iter()
        .map(|p| match &p.result {
            Some(Ok(r)) if matches!(r.kind, ResponseKind::Values { .. }) => {
                Some(ValueBlocks::new(&r.bytes).peekable())
            }
            _ => None,
        })
        .collect();
    for (i, key) in req.keys(&slot.frame).enumerate() {
        let p = part_of_key(slot, i);
        let hit = match cursors.get_mut(p) {
            Some(Some(c)) => match c.peek() {
                Some(b) if b.header.key == key => c.next(),
                _ => None,
            },
            _ => None,
        };
        f(i, key, p, hit);
    }
}

/// Round one is in: ask backups for what missed, or finish.
fn after_round_one(f: &Flow<'_, impl Inbox, impl Pool>, slot: &mut Slot) -> ReadStage {
    let (w, req) = (f.w, &f.req);
    let mut next = ReadStage::Done;
    drop_misbehaving_servers(w, slot, req);
    if !w.router.has_backups() {
        return next;
    }
    if changes_ttl(req) {
        let frame = slot.frame.clone();
        let mut found: SmallVec<[(u32, bytes::Bytes, usize); 4]> = SmallVec::new();
        walk(slot, req, |i, key, p, hit| {
            if hit.is_some() {
                if let Some(part) = slot.parts.get(p) {
                    found.push((i as u32, frame.slice_ref(key), part.server as usize));
                }
            }
        });
        mirror_ttl_changes(f, slot, &found);
        if slot
            .parts
            .iter()
            .any(|p| matches!(p.role, Role::Touch { .. }))
        {
            // Settled in `after_fallback`, whether or not a key falls back.
            next = ReadStage::Fallback;
        }
    }
    // Refused for its size: the backup's answer would be no smaller.
    if slot.oversize().is_some() {
        return next;
    }
    // Every key found (the common case): nothing to look for elsewhere.
    let all_hit = key_parts(slot).is_empty()
        && matches!(slot.parts.as_slice(), [p] if matches!(&p.result,
            Some(Ok(r)) if r.kind == ResponseKind::Values { hits: req.nkeys }));
    if all_hit {
        return next;
    }
    let wanted = fallbacks_wanted(w, slot, req);
    if wanted.is_empty() {
        return next;
    }
    ask_backups(f, slot, wanted);
    ReadStage::Fallback
}

/// A key of a read that a backup is asked for in round two.
#[derive(Debug, Clone, Copy)]
struct Wanted {
    /// The key's number in the request.
    key: u32,
    /// The backup to ask.
    backup: usize,
    /// The key's primary.
    primary: usize,
}

/// The keys round one did not find (or could not look up) that a backup
/// may serve.
fn fallbacks_wanted(w: &Cluster<impl Pool>, slot: &Slot, req: &Request) -> SmallVec<[Wanted; 4]> {
    let fallback = w.miss_fallback;
    let mut wanted: SmallVec<[Wanted; 4]> = SmallVec::new();
    walk(slot, req, |i, key, p, hit| {
        if hit.is_some() || part_of_key(slot, i) as u16 == NO_PART {
            return;
        }
        let Some(part) = slot.parts.get(p) else {
            return;
        };
        let failed =
            !matches!(&part.result, Some(Ok(r)) if matches!(r.kind, ResponseKind::Values { .. }));
        if failed {
            // It may or may not have applied a TTL change.
            skipped_ttl_change(w, req, part.server as usize, key);
        }
        if !failed && !fallback {
            return;
        }
        let replicas = w.router.replicas(key);
        let Some(tier) = replicas.iter().position(|s| s == part.server as usize) else {
            return;
        };
        if let Some(next) = super::first_serving(w, &replicas, key, tier + 1, |_| {}) {
            wanted.push(Wanted {
                key: i as u32,
                backup: replicas.get(next).unwrap_or(0),
                primary: replicas.primary(),
            });
        }
    });
    wanted
}

/// Round two: each wanted key asked of its backup with `mg`, so flags,
/// remaining TTL (and CAS) come back.
fn ask_backups(
    f: &Flow<'_, impl Inbox, impl Pool>,
    slot: &mut Slot,
    wanted: SmallVec<[Wanted; 4]>,
) {
    let (w, req) = (f.w, &f.req);
    let frame = slot.frame.clone();
    let flags: &[u8] = if matches!(req.command, Command::Gets | Command::Gats) {
        b"v f t c"
    } else {
        b"v f t"
    };
    let touch = matches!(req.command, Command::Gat | Command::Gats).then_some(req.exptime);
    let mut keys = req.keys(&frame).enumerate();
    for Wanted {
        key: i,
        backup: server,
        primary,
    } in wanted
    {
        let Some((_, key)) = keys.find(|(k, _)| *k == i as usize) else {
            break;
        };
        // Before the backup is read: a write that goes past the primary
        // from now on (and may change the backup after this read) records
        // a key on it, which `after_repair` sees.
        let epoch = w.servers[primary].health().missed.epoch();
        let part = slot.parts.len();
        let queued = w.servers[server].send(
            Expect::Meta,
            f.reply_to(part),
            |b| compose::meta_get(b, key, flags, touch),
            None,
        );
        slot.push_part(
            Part::with_role(server, Role::Fallback { key: i, epoch }),
            queued,
        );
    }
}

/// Round two is in: write backup hits back to the primaries that missed
/// them, and answer once that is done, so a write the client makes next
/// cannot be overtaken by this repair.
fn after_fallback(f: &Flow<'_, impl Inbox, impl Pool>, slot: &mut Slot) -> ReadStage {
    let (w, req) = (f.w, &f.req);
    let mut next = ReadStage::Done;
    let absent = settle_ttl_changes(w, slot, req);
    if copy_expired_copies(f, slot, &absent) {
        next = ReadStage::Repair;
    }
    let frame = slot.frame.clone();
    let repairs = repairs_wanted(w, slot, req, &frame);
    for Repair {
        primary,
        flags,
        exptime,
        value,
        part: idx,
    } in repairs
    {
        let Some(Some(Ok(reply))) = slot.parts.get(idx).map(|p| p.result.as_ref()) else {
            continue;
        };
        let len = value.len();
        let value = reply.bytes.slice(value);
        let Role::Fallback { key: i, epoch } = slot.parts[idx].role else {
            continue;
        };
        let Some(key) = req.keys(&frame).nth(i as usize) else {
            continue;
        };
        tracing::trace!(
            server = %w.servers[primary].health().name,
            key = %String::from_utf8_lossy(key),
            from = %w.servers[slot.parts[idx].server as usize].health().name,
            "read repair: add"
        );
        let queued = w.servers[primary].send_for_key(
            key,
            Expect::Storage,
            f.reply_to(slot.parts.len()),
            |b| compose::storage_line(b, Command::Add, key, flags, exptime, len, 0),
            Some(value),
        );
        slot.push_part(
            Part::with_role(primary, Role::Repair { key: i, epoch }),
            queued,
        );
        next = ReadStage::Repair;
    }
    next
}

/// A backup hit of round two to write back to its primary.
#[derive(Debug, Clone)]
struct Repair {
    primary: usize,
    flags: u32,
    exptime: i32,
    /// Where the value is in the backup's reply.
    value: std::ops::Range<usize>,
    /// The fallback part that holds that reply.
    part: usize,
}

/// The backup hits to write back: those whose primary answered round one
/// (a miss) and whose primary and backup both still serve the key.
fn repairs_wanted(
    w: &Cluster<impl Pool>,
    slot: &Slot,
    req: &Request,
    frame: &bytes::Bytes,
) -> SmallVec<[Repair; 4]> {
    let mut repairs: SmallVec<[Repair; 4]> = SmallVec::new();
    for (idx, part) in slot.parts.iter().enumerate() {
        let Role::Fallback { key: i, .. } = part.role else {
            continue;
        };
        let Some(Ok(reply)) = &part.result else {
            continue;
        };
        if reply.kind != ResponseKind::Meta(MetaStatus::Value) {
            continue;
        }
        w.stats.backup_hits.incr();
        let i = i as usize;
        let Some(key) = req.keys(frame).nth(i) else {
            continue;
        };
        // Repair only a primary that answered (a miss): not one that failed.
        let p1 = part_of_key(slot, i);
        let Some(first) = slot.parts.get(p1) else {
            continue;
        };
        let primary = w.router.primary(key);
        if first.server as usize != primary || !matches!(&first.result, Some(Ok(_))) {
            continue;
        }
        // A write that went past the primary since its miss (recorded it
        // as missing the key) may have changed the backup after we read
        // it: the value in hand may be older than an acknowledged write.
        // Nor is a value copied from a backup that may no longer serve the
        // key (it missed a write of it since, or was marked down).
        if !w.servers[primary].health().serves(key)
            || !w.servers[part.server as usize].health().serves(key)
        {
            w.stats.repairs_skipped.incr();
            continue;
        }
        let mf = meta_flags(&reply.bytes);
        let Some((off, len)) = mf.data else { continue };
        let exptime = match req.command {
            Command::Gat | Command::Gats => i64::from(req.exptime),
            _ => match super::exptime_from_ttl(mf.ttl) {
                Some(e) => e,
                None => continue, // expiring now: not worth copying
            },
        };
        let Ok(exptime) = i32::try_from(exptime) else {
            continue;
        };
        repairs.push(Repair {
            primary,
            flags: mf.flags.unwrap_or(0),
            exptime,
            value: off..off + len,
            part: idx,
        });
    }
    repairs
}

/// The repairs are in: count them, and undo any that may be older than a
/// write. A write that went past the primary after the backup was read
/// (a fall-back write on a restarted primary, a failover) may have changed
/// the backup's item after this copy of it was taken; it moved the
/// primary's missed-key epoch, and its invalidation (the prober's delete,
/// on another connection) could reach memcached before this add did. Any
/// move since the backup was read therefore deletes the copy, on the
/// connection the add took, so after it (`Mirror::delete`, which records
/// the key as missed if that delete fails too). An add whose outcome is
/// unknown (a timeout) is treated as landed. Records are rare (failure
/// episodes), and a deleted copy only costs the next read a fallback.
fn after_repair(w: &Cluster<impl Pool>, slot: &mut Slot, req: &Request) -> ReadStage {
    let frame = slot.frame.clone();
    for part in slot.parts.iter() {
        if let Role::TtlCopy { key } = part.role {
            // Refused because a value got there first: fine. Unknown: the
            // tier may hold anything, so it misses the key.
            let failed = !matches!(&part.result, Some(Ok(r)) if r.kind != ResponseKind::Error);
            if failed {
                if let Some(k) = req.keys(&frame).nth(key as usize) {
                    w.servers[part.server as usize]
                        .health()
                        .missed
                        .record_failed(k, super::given_up(&part.result));
                }
            }
            continue;
        }
        let Role::Repair { key, epoch } = part.role else {
            continue;
        };
        let stored = match &part.result {
            Some(Ok(r)) if r.kind == ResponseKind::Stored => true,
            Some(Err(_)) => false,
            // Not stored (the primary had a value by then): nothing landed.
            _ => {
                w.stats.repairs_skipped.incr();
                continue;
            }
        };
        let primary = part.server as usize;
        if w.servers[primary].health().missed.epoch() == epoch {
            if stored {
                w.stats.repairs.incr();
            } else {
                w.stats.repairs_skipped.incr();
            }
            continue;
        }
        w.stats.repairs_skipped.incr();
        if let Some(k) = req.keys(&frame).nth(key as usize) {
            w.mirror.delete(primary, frame.slice_ref(k));
        }
    }
    ReadStage::Done
}

/// The client's reply: hits in request order, then `END`.
pub(crate) fn render(w: &Cluster<impl Pool>, slot: &Slot, req: &Request, out: &mut OutQueue) {
    let nkeys = u64::from(req.nkeys);
    w.stats.cmd_get.add(nkeys);
    if refused_for_size(w, slot, out) {
        return;
    }
    let gets = matches!(req.command, Command::Gets | Command::Gats);
    // The common case: one server answered for every key, nothing else to
    // add (`gets` has its uniques made into tokens: `ha::cas`).
    if slot.parts.len() == 1 && key_parts(slot).is_empty() && !gets {
        if let Some(Ok(reply)) = &slot.parts[0].result {
            if let ResponseKind::Values { hits } = reply.kind {
                if u64::from(hits) <= nkeys && keys_match(slot, req, reply) {
                    w.stats.get_hits.add(u64::from(hits));
                    w.stats.get_misses.add(nkeys - u64::from(hits));
                    return out.put_bytes(reply.bytes.clone());
                }
            }
        }
    }
    let round_one = slot
        .parts
        .iter()
        .take_while(|p| p.role == Role::Main)
        .count();
    let fallback: SmallVec<[&Part; 4]> = slot.parts[round_one..]
        .iter()
        .filter(|p| matches!(p.role, Role::Fallback { .. }))
        .collect();
    let mut fb = 0;
    let mut hits = 0;
    walk(slot, req, |i, key, p, hit| {
        let key_of = |p: &Part| match p.role {
            Role::Fallback { key, .. } => key as usize,
            _ => usize::MAX,
        };
        while fb < fallback.len() && key_of(fallback[fb]) < i {
            fb += 1;
        }
        if let Some(block) = hit {
            if let Some(Ok(reply)) = &slot.parts[p].result {
                if gets {
                    let h = &block.header;
                    let stamp = w.servers[slot.parts[p].server as usize].health().stamp();
                    let cas = super::cas::token(stamp, h.cas.unwrap_or(0));
                    out.compose(|b| compose::value_header(b, key, h.flags, h.len, Some(cas)));
                    out.put_bytes(reply.bytes.slice(block.data().start..block.end));
                } else {
                    out.put_bytes(reply.bytes.slice(block.start..block.end));
                }
                hits += 1;
            }
            return;
        }
        if fb < fallback.len() && key_of(fallback[fb]) == i {
            if let Some(Ok(reply)) = &fallback[fb].result {
                if reply.kind == ResponseKind::Meta(MetaStatus::Value) {
                    let mf = meta_flags(&reply.bytes);
                    if let Some((off, len)) = mf.data {
                        let stamp = w.servers[fallback[fb].server as usize].health().stamp();
                        let cas = gets.then(|| super::cas::token(stamp, mf.cas.unwrap_or(0)));
                        out.compose(|b| {
                            compose::value_header(b, key, mf.flags.unwrap_or(0), len, cas)
                        });
                        out.put_bytes(reply.bytes.slice(off..off + len + 2));
                        hits += 1;
                    }
                }
            }
        }
    });
    out.put_slice(b"END\r\n");
    w.stats.get_hits.add(hits);
    w.stats.get_misses.add(nkeys.saturating_sub(hits));
}

/// A read refused for its size gets one error line instead of a partial
/// answer (missing values would read as misses).
pub(super) fn refused_for_size(w: &Cluster<impl Pool>, slot: &Slot, out: &mut OutQueue) -> bool {
    let Some(e) = slot.oversize() else {
        return false;
    };
    w.stats.server_errors.incr();
    match e.failure {
        Failure::ReplyTooLarge => w.stats.replies_too_large.incr(),
        _ => w.stats.replies_over_client_buffer.incr(),
    }
    out.put_slice(e.reply());
    true
}

/// Whether the reply's VALUE keys are, in order, among the requested keys
/// (a server that answers for keys nobody asked for is not forwarded).
fn keys_match(slot: &Slot, req: &Request, reply: &crate::backend::BackendReply) -> bool {
    let mut keys = req.keys(&slot.frame);
    'blocks: for block in ValueBlocks::new(&reply.bytes) {
        for k in keys.by_ref() {
            if k == block.header.key {
                continue 'blocks;
            }
        }
        return false;
    }
    true
}
