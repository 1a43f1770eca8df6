//! Meta reads: `mg` and `me`, one key each.
//!
//! The request goes as the client wrote it (minus `q`) to the key's first
//! serving replica. An `mg` that missed or failed there asks the next one;
//! a backup hit for a primary that missed is fetched again with what a copy
//! needs and added to the primary (mode E: a value written meanwhile wins)
//! before the client is answered; an `mg ... N` that no replica could
//! answer with an item is sent again whole, and creates it.

use memrelay_protocol::Expect;
use memrelay_protocol::{compose, meta_flags, Command, MetaStatus, Request, ResponseKind};

use super::flow::{Flow, State};
use super::read::{
    changes_ttl, mirror_ttl_changes, refused_for_size, settle_ttl_changes, skipped_ttl_change,
};
use super::slot::{Part, Role, Slot};
use super::{Cluster, Inbox, Pool};
use crate::net::outqueue::OutQueue;

/// A meta read's own state, in its slot (`State::MetaRead`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct MetaRead(MetaStage);

/// Where a meta read stands. Each step returns the next (`advance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetaStage {
    /// Sent to the key's first serving replica. `vivify_pending`: an
    /// `mg ... N` travels without its `N` (see `vivify`), which it gets
    /// back once no replica has the item.
    RoundOne { vivify_pending: bool },
    /// Sent to the next replica after a miss or a failure (or, with
    /// `vivify_pending` cleared, sent whole to create the item); or its
    /// TTL change copied to the later tiers.
    Fallback { vivify_pending: bool },
    /// A backup hit fetched again with what its repair needs.
    RepairFetch,
    /// That item added to the primary.
    Repair,
    /// Nothing more to send.
    Done,
}

impl MetaRead {
    pub(crate) fn is_done(&self) -> bool {
        self.0 == MetaStage::Done
    }
}

/// All of a meta read's parts are in: its next step.
pub(crate) fn advance(f: &Flow<'_, impl Inbox, impl Pool>, slot: &mut Slot) {
    let State::MetaRead(MetaRead(stage)) = slot.state else {
        return;
    };
    let next = match stage {
        MetaStage::RoundOne { vivify_pending } => after_round_one(f, slot, vivify_pending),
        MetaStage::Fallback { vivify_pending } => after_fallback(f, slot, vivify_pending),
        MetaStage::RepairFetch => after_repair_fetch(f, slot),
        MetaStage::Repair => after_repair(f.w, slot, &f.req),
        MetaStage::Done => MetaStage::Done,
    };
    slot.state = State::MetaRead(MetaRead(next));
}

/// `mg` (and `me`): one key, sent to its first serving replica as the
/// client wrote it, minus `q`.
pub(crate) fn start(f: &Flow<'_, impl Inbox, impl Pool>, slot: &mut Slot) {
    let (w, req) = (f.w, &f.req);
    let frame = slot.frame.clone();
    let route = super::route_key(&frame, req);
    let replicas = w.router.replicas(&route);
    slot.replicas = Some(replicas);
    let vivify_pending = super::vivifies_later(w, req);
    slot.state = State::MetaRead(MetaRead(MetaStage::RoundOne { vivify_pending }));
    let Some((tier, server)) = super::serving(w, &replicas, &route, 0, |s| {
        skipped_ttl_change(w, req, s, &route)
    }) else {
        return;
    };
    if tier > 0 {
        w.stats.failovers.incr();
    }
    send(f, slot, server, vivify_pending);
}

/// Sends the request to `server`; `strip_n`: without its `N` (see
/// `vivify`).
fn send(f: &Flow<'_, impl Inbox, impl Pool>, slot: &mut Slot, server: usize, strip_n: bool) {
    let (w, req) = (f.w, &f.req);
    let frame = slot.frame.clone();
    let mut wire = super::meta_wire(req, false);
    wire.strip_n = strip_n;
    let queued = w.servers[server].send(
        wire.expect,
        f.reply_to(slot.parts.len()),
        |b| super::write_meta(b, &frame, req, req.key.of(&frame), wire),
        None,
    );
    slot.push_part(Part::new(server), queued);
}

/// An `mg` that missed (`EN`) or failed on its replica asks the next one.
fn after_round_one(
    f: &Flow<'_, impl Inbox, impl Pool>,
    slot: &mut Slot,
    vivify_pending: bool,
) -> MetaStage {
    let (w, req) = (f.w, &f.req);
    if req.command != Command::MetaGet {
        return MetaStage::Done;
    }
    let Some(replicas) = slot.replicas else {
        return MetaStage::Done;
    };
    let Some(first) = slot.parts.first() else {
        return MetaStage::Done;
    };
    let route = super::route_key(&slot.frame, req);
    let found = matches!(&first.result, Some(Ok(r)) if !is_meta_miss(r.kind) && r.kind != ResponseKind::Error);
    if found && changes_ttl(req) {
        let server = first.server as usize;
        mirror_ttl_changes(f, slot, &[(0, route, server)]);
        // Settled in `after_fallback`.
        return MetaStage::Fallback { vivify_pending };
    }
    let missed = match &first.result {
        Some(Ok(r)) => is_meta_miss(r.kind) && w.miss_fallback,
        Some(Err(e)) => !e.failure.is_oversize(),
        None => false,
    };
    if matches!(&first.result, Some(Err(_))) {
        skipped_ttl_change(w, req, first.server as usize, &route);
    }
    if !missed {
        return MetaStage::Done;
    }
    let Some(tier) = replicas.iter().position(|s| s == first.server as usize) else {
        return MetaStage::Done;
    };
    let Some(next) = super::first_serving(w, &replicas, &route, tier + 1, |_| {}) else {
        return vivify(f, slot, vivify_pending);
    };
    let server = replicas.get(next).unwrap_or(0);
    send(f, slot, server, vivify_pending);
    if let Some(p) = slot.parts.last_mut() {
        p.role = Role::Fallback { key: 0, epoch: 0 };
    }
    MetaStage::Fallback { vivify_pending }
}

/// An `mg` that fell back: a backup hit for a primary that missed is copied
/// back before the `mg` is answered; a miss everywhere may create the item
/// (`N`, see `vivify`).
fn after_fallback(
    f: &Flow<'_, impl Inbox, impl Pool>,
    slot: &mut Slot,
    vivify_pending: bool,
) -> MetaStage {
    let (w, req) = (f.w, &f.req);
    // (An `mg ... T` may not carry the value a copy would need: a tier
    // whose copy had expired just stays without one.)
    let _ = settle_ttl_changes(w, slot, req);
    if slot.parts.iter().any(|p| p.role == Role::Vivify) {
        return MetaStage::Done; // the item was created: nothing to repair
    }
    let fell_back_to_a_miss = matches!(meta_fallback_part(slot).map(|p| &p.result),
        Some(Some(Ok(r))) if is_meta_miss(r.kind));
    if fell_back_to_a_miss {
        return vivify(f, slot, vivify_pending);
    }
    let (Some(first), Some(second)) = (slot.parts.first(), meta_fallback_part(slot)) else {
        return MetaStage::Done;
    };
    let hit = matches!(&second.result, Some(Ok(r)) if matches!(r.kind, ResponseKind::Meta(MetaStatus::Value | MetaStatus::Hd)));
    if !hit {
        return MetaStage::Done;
    }
    w.stats.backup_hits.incr();
    let route = super::route_key(&slot.frame, req);
    let primary = w.router.primary(&route);
    let primary_missed = matches!(&first.result, Some(Ok(_))) && first.server as usize == primary;
    if !primary_missed {
        return MetaStage::Done;
    }
    // The repair is part of the request, as a classic read's is: the
    // client's next request on the key (a delete, say) must not be
    // overtaken by it. The reply may not carry what a copy needs (value,
    // flags, TTL), so the backup is asked for them first.
    let backup = second.server as usize;
    let epoch = w.servers[primary].health().missed.epoch();
    let (wire, b64) = meta_wire_key(&route);
    let flags: &[u8] = if b64 { b"b v f t" } else { b"v f t" };
    let queued = w.servers[backup].send_for_key(
        &route,
        Expect::Meta,
        f.reply_to(slot.parts.len()),
        |b| compose::meta_get(b, &wire, flags, None),
        None,
    );
    slot.push_part(Part::with_role(backup, Role::RepairFetch { epoch }), queued);
    MetaStage::RepairFetch
}

/// How a key travels in a meta request the proxy makes: as it is, or in
/// base64 (with the `b` flag) when a classic command could not carry it.
fn meta_wire_key(route: &[u8]) -> (Vec<u8>, bool) {
    if super::is_text_key(route) {
        (route.to_vec(), false)
    } else {
        let mut enc = Vec::with_capacity(route.len() * 4 / 3 + 4);
        memrelay_protocol::base64::encode(route, &mut enc);
        (enc, true)
    }
}

/// An `mg` repair's fetch is in: add the item to the primary (mode E: only
/// if it has none by then), unless a write went past the primary since,
/// or the backup may no longer serve the key.
fn after_repair_fetch(f: &Flow<'_, impl Inbox, impl Pool>, slot: &mut Slot) -> MetaStage {
    let (w, req) = (f.w, &f.req);
    let Some((backup, epoch, reply)) = slot.parts.iter().find_map(|p| match (&p.role, &p.result) {
        (Role::RepairFetch { epoch }, Some(Ok(r)))
            if r.kind == ResponseKind::Meta(MetaStatus::Value) =>
        {
            Some((p.server as usize, *epoch, r.bytes.clone()))
        }
        _ => None,
    }) else {
        return MetaStage::Done;
    };
    let route = super::route_key(&slot.frame, req);
    let primary = w.router.primary(&route);
    if !w.servers[primary].health().serves(&route) || !w.servers[backup].health().serves(&route) {
        w.stats.repairs_skipped.incr();
        return MetaStage::Done;
    }
    let mf = meta_flags(&reply);
    let Some((off, len)) = mf.data else {
        return MetaStage::Done;
    };
    let Some(ttl) = super::exptime_from_ttl(mf.ttl) else {
        return MetaStage::Done;
    };
    let mut flags = format!("F{} T{} ME", mf.flags.unwrap_or(0), ttl).into_bytes();
    let (wire, b64) = meta_wire_key(&route);
    if b64 {
        flags.extend_from_slice(b" b");
    }
    let queued = w.servers[primary].send_for_key(
        &route,
        Expect::Meta,
        f.reply_to(slot.parts.len()),
        |b| compose::meta_line(b, Command::MetaSet, &wire, Some(len), &flags),
        Some(reply.slice(off..off + len)),
    );
    slot.push_part(
        Part::with_role(primary, Role::Repair { key: 0, epoch }),
        queued,
    );
    MetaStage::Repair
}

/// An `mg` repair landed, or not: as `ha::read::after_repair`, a copy that may be
/// older than a write that went past the primary since the backup was
/// read is deleted again (an add whose outcome is unknown counts as
/// landed).
fn after_repair(w: &Cluster<impl Pool>, slot: &mut Slot, req: &Request) -> MetaStage {
    let route = super::route_key(&slot.frame, req);
    for part in slot.parts.iter() {
        let Role::Repair { epoch, .. } = part.role else {
            continue;
        };
        let landed = match &part.result {
            Some(Ok(r)) => r.kind == ResponseKind::Meta(MetaStatus::Hd),
            _ => true,
        };
        let primary = part.server as usize;
        if landed && w.servers[primary].health().missed.epoch() != epoch {
            w.stats.repairs_skipped.incr();
            w.mirror.delete(primary, route.clone());
        } else if landed && part.result.as_ref().is_some_and(|r| r.is_ok()) {
            w.stats.repairs.incr();
        } else {
            w.stats.repairs_skipped.incr();
        }
    }
    MetaStage::Done
}

/// The reply to `mg`/`me`: the backup's when it found the item, else the
/// primary's; with `q`, a miss says nothing.
pub(crate) fn render(w: &Cluster<impl Pool>, slot: &Slot, req: &Request, out: &mut OutQueue) {
    if refused_for_size(w, slot, out) {
        return;
    }
    fn answered(p: &Part) -> Option<&crate::backend::BackendReply> {
        match &p.result {
            Some(Ok(r)) => Some(r),
            _ => None,
        }
    }
    let fallback_hit = meta_fallback_part(slot)
        .and_then(answered)
        .filter(|r| !is_meta_miss(r.kind));
    let vivified = slot
        .parts
        .iter()
        .rev()
        .find(|p| p.role == Role::Vivify)
        .and_then(answered);
    let reply = vivified
        .or(fallback_hit)
        .or_else(|| slot.parts.iter().find_map(answered));
    let Some(reply) = reply else {
        // Nobody could answer: a miss, as memcached words it (with the
        // opaque and key echoed, so pipelining clients can match it).
        if req.command == Command::MetaGet && !req.meta.quiet {
            out.put_slice(b"EN");
            echo_opaque_and_key(slot, req, out);
            out.put_slice(b"\r\n");
        } else if req.command == Command::MetaDebug {
            out.put_slice(super::write::NO_SERVER);
        }
        return;
    };
    if reply.kind == ResponseKind::Error {
        w.stats.server_errors.incr();
    }
    if let Some(b) = super::meta_client_reply(req, super::meta_wire(req, false), reply) {
        out.put_bytes(with_cas_token(
            w,
            slot,
            req,
            super::server_of(slot, reply),
            b,
        ));
    }
}

/// A meta reply with its `c` flag made a token (`ha::cas`), when the
/// request asked for it.
pub(crate) fn with_cas_token(
    w: &Cluster<impl Pool>,
    slot: &Slot,
    req: &Request,
    server: Option<usize>,
    reply: bytes::Bytes,
) -> bytes::Bytes {
    let Some(server) = server else { return reply };
    if !super::cas::asks_cas(req.meta.flags.of(&slot.frame)) {
        return reply;
    }
    match super::cas::meta_reply_with_token(&reply, w.servers[server].health().stamp()) {
        Some(v) => bytes::Bytes::from(v),
        None => reply,
    }
}

/// No replica has the item an `mg ... N` asked for: send it whole to the
/// first replica that serves the key, which creates it (and hands out the
/// win flag). Nothing when its `N` is not held back (`vivify_pending`).
fn vivify(f: &Flow<'_, impl Inbox, impl Pool>, slot: &mut Slot, vivify_pending: bool) -> MetaStage {
    let (w, req) = (f.w, &f.req);
    if !vivify_pending {
        return MetaStage::Done;
    }
    let Some(replicas) = slot.replicas else {
        return MetaStage::Done;
    };
    let route = super::route_key(&slot.frame, req);
    let Some((_, server)) = super::serving(w, &replicas, &route, 0, |_| {}) else {
        return MetaStage::Done;
    };
    send(f, slot, server, false);
    if let Some(p) = slot.parts.last_mut() {
        p.role = Role::Vivify;
    }
    MetaStage::Fallback {
        vivify_pending: false,
    }
}

/// An `mg`'s second round, if it had one (its TTL copies are not).
fn meta_fallback_part(slot: &Slot) -> Option<&Part> {
    slot.parts
        .iter()
        .find(|p| matches!(p.role, Role::Fallback { .. }))
}

/// A meta get that found nothing: `EN`, or nothing at all in quiet mode.
fn is_meta_miss(kind: ResponseKind) -> bool {
    matches!(kind, ResponseKind::Meta(MetaStatus::En | MetaStatus::Mn))
}

/// memcached echoes `O` and `k` flags even on a miss.
fn echo_opaque_and_key(slot: &Slot, req: &Request, out: &mut OutQueue) {
    for tok in req
        .meta
        .flags
        .of(&slot.frame)
        .split(|&b| b == b' ')
        .filter(|t| !t.is_empty())
    {
        match tok[0] {
            b'O' => {
                out.put_slice(b" ");
                out.put_slice(tok);
            }
            b'k' => {
                out.put_slice(b" k");
                out.put_slice(req.key.of(&slot.frame));
                if req.meta.base64 {
                    out.put_slice(b" b");
                }
            }
            _ => {}
        }
    }
}
