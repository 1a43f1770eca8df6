//! High availability: where each request goes when servers fail, how writes
//! reach the backups, and how a server that missed writes is kept from
//! serving stale data. See docs/ha.md for the contract, command by command.
//!
//! - [`read`]: reads from the primary, falling back to the backup on a miss
//!   or a failure, and writing backup hits back to the primary (`add`, so a
//!   newer value is never overwritten);
//! - [`write`]: writes to the primary, mirrored to the backups according to
//!   the primary's answer before the client is answered; to the backup
//!   (exactly once) when the primary cannot take it;
//! - [`mirror`]: background writes nobody waits for (invalidating an
//!   unlinked key, the two-step repair after an `mg` fallback);
//! - [`missed`]: per server, the keys it must not serve until invalidated;
//! - [`resync`]: copying a restarted (empty) server's items back from the
//!   other tier in the background.

pub mod mirror;
pub mod missed;
pub mod read;
pub mod resync;
pub mod write;

use bytes::Bytes;
use memrelay_protocol::{base64, Request};

use crate::proxy::Worker;
use crate::router::Replicas;

/// The key a request is routed by: the key itself, or for a meta command
/// with the `b` flag, its base64-decoded bytes (so `mg a2V5 b` and `get key`
/// reach the same server). Only the `b` case allocates.
pub fn route_key(frame: &Bytes, req: &Request) -> Bytes {
    let raw = frame.slice(req.key.start as usize..req.key.end());
    if req.meta.base64 {
        if let Some(decoded) = base64::decode(&raw) {
            return Bytes::from(decoded);
        }
    }
    raw
}

/// The replica to use for `key`, from tier `from` on: the first serving
/// tier, as (tier, server). Without backups and with `--auto-eject`, when
/// the primary cannot serve the key, the next primary on the ring that can,
/// reported as tier `replicas.len()` (past the real tiers, so a retry after
/// it finds nothing more).
pub fn serving(
    w: &Worker,
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

/// Whether `key` can be written in a classic command (`delete <key>`):
/// otherwise it must go through a meta command in base64.
pub fn is_text_key(key: &[u8]) -> bool {
    !key.is_empty()
        && key.len() <= memrelay_protocol::KEY_MAX_LENGTH
        && !key.iter().any(|&b| matches!(b, b' ' | b'\r' | b'\n' | 0))
}

/// The first tier, from `from` on, whose server can serve `key`. Tiers that
/// cannot are returned in `skipped` order through `on_skip`.
pub fn first_serving(
    w: &Worker,
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
