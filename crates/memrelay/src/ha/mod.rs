//! High availability: where each request goes when servers fail, how writes
//! reach the backups, and how a server that missed writes is kept from
//! serving stale data. See docs/ha.md for the contract, command by command.
//!
//! - [`read`]: reads from the primary, falling back to the backup on a miss
//!   or a failure, and writing backup hits back to the primary (`add`, so a
//!   newer value is never overwritten);
//! - [`meta_read`]: the same for `mg` and `me`, which also create the item
//!   (`N`) once no replica has it;
//! - [`write`]: writes to the primary, mirrored to the backups according to
//!   the primary's answer before the client is answered; to the backup
//!   (exactly once) when the primary cannot take it;
//! - [`mirror`]: background writes nobody waits for (invalidating an
//!   unlinked key, undoing a read repair that may be older than a write);
//! - [`missed`]: per server, the keys it must not serve until invalidated;
//! - [`settle`]: when a delete on a server may clear those keys (once what
//!   it held from before its last failure has been applied);
//! - [`resync`]: copying a restarted (empty) server's items back from the
//!   other tier in the background;
//! - [`transition`]: during a fleet reload, what a moved key's replicas
//!   under the other routing must not serve.

pub mod cas;
#[cfg(test)]
pub(crate) mod fake;
pub(crate) mod flow;
pub(crate) mod meta_read;
pub(crate) mod mirror;
pub(crate) mod missed;
pub(crate) mod persist;
pub(crate) mod read;
pub(crate) mod replica;
pub(crate) mod resync;
pub(crate) mod settle;
pub(crate) mod slot;
pub(crate) mod transition;
pub(crate) mod upkeep;
pub(crate) mod write;

use std::rc::Rc;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use memrelay_protocol::{base64, Expect, Request};

use crate::backend::{BackendError, ReplyTo, ServerPool, Sink};
use crate::router::{Replicas, Router};
use crate::stats::WorkerStats;

/// What the HA steps of one worker thread use under one configuration: the
/// routing, the thread's servers, the policies, the counters and the
/// background writes. It is part of the proxy's `Worker` (which derefs to
/// it), declared here so that ha does not depend on the layer above it.
#[derive(Debug)]
pub(crate) struct Cluster<P: Pool = ServerPool> {
    pub router: Router,
    /// Primaries then backups, indexed like `Config::servers`.
    pub servers: Rc<[replica::Server<P>]>,
    /// Ask the backup when the primary misses.
    pub miss_fallback: bool,
    /// No backups: move a dead server's keys to the next server on the ring.
    pub auto_eject: bool,
    /// Background writes to backups (mirrors, repairs).
    pub mirror: Rc<mirror::Mirror<P>>,
    pub stats: Arc<WorkerStats>,
    /// A fleet reload under way: the other members' other routing.
    pub transition: Option<Arc<transition::Transition>>,
}

/// Where the server replies of a request go: the session's inbox
/// (`proxy::session::Inbox`), named here by what ha needs of it (a `Sink`
/// it can address replies to) so that ha does not depend on proxy.
pub(crate) trait Inbox: Sink + 'static {}

impl<T: Sink + 'static> Inbox for T {}

/// What the HA steps need of one server's connections on this thread: to
/// queue a request, and to drop the connections of a server that
/// misbehaved. `backend::ServerPool` is the one the proxy runs; the
/// in-process tests run the same steps against a fake (`ha::fake`). The
/// steps are generic over it, so the request path is compiled for
/// `ServerPool` alone: no dynamic call, nothing added per request.
pub(crate) trait Pool: std::fmt::Debug + 'static {
    /// Queues a request (see `ServerPool::send`).
    fn send(
        &self,
        expect: Expect,
        reply: ReplyTo,
        write: impl FnOnce(&mut BytesMut),
        value: Option<Bytes>,
    ) -> Result<(), BackendError>;

    /// Queues a request on the connection `key`'s requests take (see
    /// `ServerPool::send_for_key`).
    fn send_for_key(
        &self,
        key: &[u8],
        expect: Expect,
        reply: ReplyTo,
        write: impl FnOnce(&mut BytesMut),
        value: Option<Bytes>,
    ) -> Result<(), BackendError>;

    /// The server misbehaved above the framing (see `ServerPool::poison`).
    fn poison(&self, why: &str);
}

impl Pool for ServerPool {
    #[inline]
    fn send(
        &self,
        expect: Expect,
        reply: ReplyTo,
        write: impl FnOnce(&mut BytesMut),
        value: Option<Bytes>,
    ) -> Result<(), BackendError> {
        ServerPool::send(self, expect, reply, write, value)
    }

    #[inline]
    fn send_for_key(
        &self,
        key: &[u8],
        expect: Expect,
        reply: ReplyTo,
        write: impl FnOnce(&mut BytesMut),
        value: Option<Bytes>,
    ) -> Result<(), BackendError> {
        ServerPool::send_for_key(self, key, expect, reply, write, value)
    }

    fn poison(&self, why: &str) {
        ServerPool::poison(self, why)
    }
}

/// Whether a request's `result` says it was written to its server and
/// given up on (it timed out, or its connection failed): the server may
/// still apply it later (see `MissedKeys::record_failed`).
pub(crate) fn given_up(result: &Option<crate::backend::BackendResult>) -> bool {
    matches!(result, Some(Err(e)) if e.sent)
}

/// The key a request is routed by: the key itself, or for a meta command
/// with the `b` flag, its base64-decoded bytes (so `mg a2V5 b` and `get key`
/// reach the same server). Only the `b` case allocates.
pub(crate) fn route_key(frame: &Bytes, req: &Request) -> Bytes {
    let raw = frame.slice(req.key.start as usize..req.key.end());
    if req.meta.base64 {
        if let Some(decoded) = base64::decode(&raw) {
            return Bytes::from(decoded);
        }
    }
    raw
}

/// Adds an item (`flags`, `value`) that a replica holds to `server`, which
/// had none, with the TTL `exptime` that a `gat` or a `touch` just gave it:
/// `add`, so a value written meanwhile wins. A part of `slot` in `role`,
/// whose reply the client's waits for.
pub(crate) fn push_ttl_copy(
    f: &flow::Flow<'_, impl Inbox, impl Pool>,
    slot: &mut slot::Slot,
    (server, role): (usize, slot::Role),
    key: &[u8],
    (flags, exptime): (u32, i32),
    value: &Bytes,
) {
    tracing::trace!(
        server = %f.w.servers[server].health().name,
        key = %String::from_utf8_lossy(key),
        "TTL copy: add"
    );
    let len = value.len();
    let queued = f.w.servers[server].send_for_key(
        key,
        Expect::Storage,
        f.reply_to(slot.parts.len()),
        |b| {
            memrelay_protocol::compose::storage_line(
                b,
                memrelay_protocol::Command::Add,
                key,
                flags,
                exptime,
                len,
                0,
            )
        },
        Some(value.clone()),
    );
    slot.push_part(slot::Part::with_role(server, role), queued);
}

/// The replica to use for `key`, from tier `from` on: the first serving
/// tier, as (tier, server). Without backups and with `--auto-eject`, when
/// the primary cannot serve the key, the next primary on the ring that can,
/// reported as tier `replicas.len()` (past the real tiers, so a retry after
/// it finds nothing more).
pub(crate) fn serving(
    w: &Cluster<impl Pool>,
    replicas: &Replicas,
    key: &[u8],
    from: usize,
    on_skip: impl FnMut(usize),
) -> Option<(usize, usize)> {
    if let Some(t) = first_serving(w, replicas, key, from, on_skip) {
        return replicas.get(t).map(|s| (t, s));
    }
    if w.auto_eject && from <= replicas.len() {
        let server = w
            .router
            .ejected_primary(key, |s| w.servers[s].health().serves(key))?;
        return Some((replicas.len(), server));
    }
    None
}

/// How a meta request travels to its replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MetaWire {
    /// `Meta`, or `MetaQuiet` when it keeps its `q` and is followed by `mn`
    /// (memcached then decides what to suppress, byte for byte).
    pub expect: memrelay_protocol::Expect,
    /// The proxy added `v` (an `ma` whose result must be checked on the
    /// backup); the value is taken out of the client's reply.
    pub add_v: bool,
    /// The unique to send in place of the client's `C<token>` (`ha::cas`).
    pub cas: Option<u64>,
    /// Leave `N` out: create nothing yet (see `vivifies_later`).
    pub strip_n: bool,
}

/// Quiet requests keep their `q` and are closed by an `mn`, except an `ma`
/// without `N`: memcached suppresses all its successes, so the proxy can
/// suppress them itself, which lets it ask for the new value (`v`) that a
/// backup's copy must reach.
pub(crate) fn meta_wire(req: &Request, mirrored: bool) -> MetaWire {
    use memrelay_protocol::{Command, Expect};
    let arith_unframed = req.command == Command::MetaArith && !req.meta.vivify;
    let quiet_framed = req.meta.quiet && !arith_unframed;
    MetaWire {
        expect: if quiet_framed {
            Expect::MetaQuiet
        } else {
            Expect::Meta
        },
        add_v: req.command == Command::MetaArith && mirrored && !req.meta.value && !quiet_framed,
        cas: None,
        strip_n: false,
    }
}

/// Whether an autovivifying request (`ma ... N`, `mg ... N`) first travels
/// without its `N`. The primary alone cannot tell "no item" from "lost the
/// item the backup holds" (after a restart or an invalidation); created
/// there, a fresh counter or lease would hide an acknowledged one. So the
/// request goes as a plain `ma`/`mg`, falls back to the backup on a miss
/// like any read or write, and only when no replica has the item is it
/// sent whole, creating it. Quiet requests keep the old path (their
/// replies are framed differently with and without `N`).
pub(crate) fn vivifies_later(w: &Cluster<impl Pool>, req: &Request) -> bool {
    use memrelay_protocol::Command;
    matches!(req.command, Command::MetaArith | Command::MetaGet)
        && req.meta.vivify
        && !req.meta.quiet
        && w.miss_fallback
        && w.router.has_backups()
}

/// Writes a meta request's line as `wire` says.
pub(crate) fn write_meta(
    b: &mut bytes::BytesMut,
    frame: &[u8],
    req: &Request,
    key: &[u8],
    wire: MetaWire,
) {
    use memrelay_protocol::{compose, Command, Expect};
    let keep_q = wire.expect == Expect::MetaQuiet;
    let len = (req.command == Command::MetaSet).then_some(req.value.len as usize);
    let mut extra: smallvec::SmallVec<[u8; 24]> = smallvec::SmallVec::new();
    if wire.add_v {
        extra.extend_from_slice(b" v");
    }
    if let Some(unique) = wire.cas {
        extra.extend_from_slice(b" C");
        extra.extend_from_slice(unique.to_string().as_bytes());
    }
    let swap_cas = wire.cas.is_some();
    let strip_n = wire.strip_n;
    compose::meta_line_filtered(
        b,
        req.command,
        key,
        len,
        req.meta.flags.of(frame),
        |t| (keep_q || t[0] != b'q') && !(swap_cas && t[0] == b'C') && !(strip_n && t[0] == b'N'),
        &extra,
    );
}

/// The client's `C<token>` of a meta request, if any.
pub(crate) fn meta_cas_token(frame: &[u8], req: &Request) -> Option<u64> {
    if !req.meta.cas {
        return None;
    }
    req.meta
        .flags
        .of(frame)
        .split(|&b| b == b' ')
        .find(|t| t.first() == Some(&b'C'))
        .and_then(|t| memrelay_protocol::number::parse_u64(&t[1..]))
}

/// The server whose answer `reply` is, among the slot's parts.
pub(crate) fn server_of(slot: &slot::Slot, reply: &crate::backend::BackendReply) -> Option<usize> {
    slot.parts
        .iter()
        .find(|p| matches!(&p.result, Some(Ok(r)) if std::ptr::eq(r, reply)))
        .map(|p| p.server as usize)
}

/// The client's bytes for a meta reply that travelled as `wire`: what
/// memcached would have sent for the request as the client wrote it.
pub(crate) fn meta_client_reply(
    req: &Request,
    wire: MetaWire,
    reply: &crate::backend::BackendReply,
) -> Option<bytes::Bytes> {
    use memrelay_protocol::{Command, Expect, MetaStatus, ResponseKind};
    let kind = reply.kind;
    if wire.expect == Expect::MetaQuiet {
        if kind == ResponseKind::Meta(MetaStatus::Mn) {
            return None;
        }
        return Some(reply.bytes.slice(..reply.bytes.len().saturating_sub(4)));
    }
    if req.meta.quiet
        && req.command == Command::MetaArith
        && matches!(kind, ResponseKind::Meta(MetaStatus::Hd | MetaStatus::Value))
    {
        return None;
    }
    if wire.add_v && kind == ResponseKind::Meta(MetaStatus::Value) {
        // "VA <len> <flags>\r\n<value>\r\n" -> "HD <flags>\r\n"
        let line_end = reply.bytes.iter().position(|&b| b == b'\r')?;
        let line = &reply.bytes[..line_end];
        let mut toks = line.splitn(3, |&b| b == b' ');
        let (_, _, rest) = (toks.next(), toks.next(), toks.next());
        let mut out = Vec::with_capacity(line_end + 2);
        out.extend_from_slice(b"HD");
        if let Some(r) = rest {
            out.push(b' ');
            out.extend_from_slice(r);
        }
        out.extend_from_slice(b"\r\n");
        return Some(bytes::Bytes::from(out));
    }
    Some(reply.bytes.clone())
}

/// The number in a `VA` reply (an `ma` asked with `v`).
pub(crate) fn meta_number(reply: &crate::backend::BackendReply) -> Option<u64> {
    let mf = memrelay_protocol::meta_flags(&reply.bytes);
    let (off, len) = mf.data?;
    memrelay_protocol::number::parse_u64(reply.bytes.get(off..off + len)?)
}

/// Deleting any key on a server: `delete <key>` when the key can travel in
/// a classic command, `md <base64> b` when it cannot (a binary key from a
/// meta `b` request). The reply shape to expect, then the writer.
pub(crate) fn delete_expect(key: &[u8]) -> memrelay_protocol::Expect {
    if is_text_key(key) {
        memrelay_protocol::Expect::Delete
    } else {
        memrelay_protocol::Expect::Meta
    }
}

/// Writes the delete `delete_expect` describes.
pub(crate) fn write_delete(b: &mut bytes::BytesMut, key: &[u8]) {
    memrelay_protocol::compose::delete_any(b, key);
}

/// A relative TTL longer than this is an absolute unix time to memcached.
const MAX_RELATIVE_TTL: i64 = 60 * 60 * 24 * 30;

/// The exptime to copy an item with, from the remaining TTL an `mg ... t`
/// reported: `None` when it is about to expire (not worth copying).
pub(crate) fn exptime_from_ttl(ttl: Option<i64>) -> Option<i64> {
    match ttl {
        Some(-1) | None => Some(0),
        Some(0) => None,
        // Saturating: the TTL comes from a server's reply.
        Some(t) if t > MAX_RELATIVE_TTL => Some(unix_now().saturating_add(t)),
        Some(t) => Some(t),
    }
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Whether `key` can be written in a classic command (`delete <key>`):
/// otherwise it must go through a meta command in base64.
pub(crate) fn is_text_key(key: &[u8]) -> bool {
    memrelay_protocol::compose::is_text_key(key)
}

/// The first tier, from `from` on, whose server can serve `key`. Tiers that
/// cannot are returned in `skipped` order through `on_skip`.
pub(crate) fn first_serving(
    w: &Cluster<impl Pool>,
    replicas: &Replicas,
    key: &[u8],
    from: usize,
    mut on_skip: impl FnMut(usize),
) -> Option<usize> {
    for tier in from..replicas.len() {
        let server = replicas.get(tier)?;
        if w.servers[server].health().serves(key) {
            return Some(tier);
        }
        on_skip(server);
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ttl_to_exptime() {
        assert_eq!(exptime_from_ttl(None), Some(0));
        assert_eq!(exptime_from_ttl(Some(-1)), Some(0));
        assert_eq!(exptime_from_ttl(Some(0)), None);
        assert_eq!(exptime_from_ttl(Some(60)), Some(60));
        let far = exptime_from_ttl(Some(MAX_RELATIVE_TTL + 1)).unwrap();
        assert!(far > MAX_RELATIVE_TTL);
        // A server's absurd TTL saturates instead of overflowing.
        assert_eq!(exptime_from_ttl(Some(i64::MAX)), Some(i64::MAX));
    }
}
