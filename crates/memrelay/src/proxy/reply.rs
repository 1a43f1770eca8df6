//! Turning a completed request's sub-replies into the client's reply.
//!
//! Server replies are forwarded as the bytes the server sent, by reference,
//! whenever they are exactly what the client should see; they are rebuilt
//! only for multi-gets spread over servers (merged back in request order)
//! and for replies that do not match the request (a VALUE for a key nobody
//! asked for is dropped, never forwarded).

use memrelay_protocol::response::ValueBlocks;
use memrelay_protocol::{Command, Request, ResponseKind};

use super::session::{Local, Parts, Slot};
use super::Worker;
use crate::backend::{BackendReply, BackendResult};
use crate::net::outqueue::OutQueue;

const END: &[u8] = b"END\r\n";

/// Appends the slot's reply to `out`. Returns true if the connection must
/// be closed after it.
pub fn render(w: &Worker, slot: Slot, out: &mut OutQueue) -> bool {
    if let Some(local) = slot.local {
        return match local {
            Local::Static(b) => {
                out.put_slice(b);
                false
            }
            Local::Owned(v) => {
                out.put_slice(&v);
                false
            }
            Local::Close(b) => {
                out.put_slice(b);
                true
            }
        };
    }
    let Some(req) = slot.req else { return false };
    match req.command {
        Command::Get | Command::Gets | Command::Gat | Command::Gats => {
            retrieval(w, &slot, &req, out)
        }
        Command::FlushAll => flush_all(&slot, &req, out),
        _ => {
            // Single-key commands: the server's answer, or our error.
            let Parts::One(_, Some(result)) = slot.parts else {
                return false;
            };
            if req.noreply {
                return false;
            }
            match result {
                Ok(reply) => {
                    if reply.kind == ResponseKind::Error {
                        w.stats.server_errors.incr();
                    }
                    out.put_bytes(reply.bytes)
                }
                Err(e) => {
                    w.stats.server_errors.incr();
                    out.put_slice(e.reply())
                }
            }
        }
    }
    false
}

fn flush_all(slot: &Slot, req: &Request, out: &mut OutQueue) {
    if req.noreply {
        return;
    }
    let Parts::Many(parts) = &slot.parts else {
        return;
    };
    // Every server must say OK; otherwise the first refusal or failure.
    for (_, r) in parts {
        match r {
            Some(Ok(reply)) if reply.kind == ResponseKind::Ok => {}
            Some(Ok(reply)) => return out.put_bytes(reply.bytes.clone()),
            Some(Err(e)) => return out.put_slice(e.reply()),
            None => return out.put_slice(b"SERVER_ERROR internal: missing reply\r\n"),
        }
    }
    out.put_slice(b"OK\r\n");
}

fn retrieval(w: &Worker, slot: &Slot, req: &Request, out: &mut OutQueue) {
    let nkeys = u64::from(req.nkeys);
    w.stats.cmd_get.add(nkeys);
    let hits = match &slot.parts {
        Parts::One(_, Some(result)) => one_server(w, slot, req, result, out),
        Parts::Many(parts) => merge(slot, req, parts, out),
        _ => {
            out.put_slice(END);
            0
        }
    };
    w.stats.get_hits.add(hits);
    w.stats.get_misses.add(nkeys.saturating_sub(hits));
}

/// Every key went to one server: forward its reply whole when its VALUE
/// keys are, in order, among the requested keys (the normal case).
fn one_server(
    w: &Worker,
    slot: &Slot,
    req: &Request,
    result: &BackendResult,
    out: &mut OutQueue,
) -> u64 {
    let reply = match result {
        Ok(r) => r,
        Err(_) => {
            // A server that cannot answer: its keys are misses, and the
            // client still gets its END (the HA contract for reads).
            w.stats.server_errors.incr();
            out.put_slice(END);
            return 0;
        }
    };
    match reply.kind {
        ResponseKind::Values { hits } => {
            if keys_match(slot, req, reply) {
                out.put_bytes(reply.bytes.clone());
                u64::from(hits)
            } else {
                merge_one(slot, req, reply, out)
            }
        }
        _ => {
            w.stats.server_errors.incr();
            out.put_bytes(reply.bytes.clone());
            0
        }
    }
}

/// Whether the reply's VALUE keys are a subsequence of the requested keys.
fn keys_match(slot: &Slot, req: &Request, reply: &BackendReply) -> bool {
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

/// Rebuilds a single server's reply keeping only blocks that answer a
/// requested key, in order.
fn merge_one(slot: &Slot, req: &Request, reply: &BackendReply, out: &mut OutQueue) -> u64 {
    let mut blocks = ValueBlocks::new(&reply.bytes).peekable();
    let mut hits = 0;
    for key in req.keys(&slot.frame) {
        if let Some(b) = blocks.peek() {
            if b.header.key == key {
                out.put_bytes(reply.bytes.slice(b.start..b.end));
                hits += 1;
                blocks.next();
            }
        }
    }
    tracing::debug!("server reply had VALUE blocks for keys not asked for; dropped them");
    out.put_slice(END);
    hits
}

/// Merges the replies of several servers back into request order.
fn merge(
    slot: &Slot,
    req: &Request,
    parts: &[(usize, Option<BackendResult>)],
    out: &mut OutQueue,
) -> u64 {
    let mut cursors: Vec<Option<std::iter::Peekable<ValueBlocks<'_>>>> = parts
        .iter()
        .map(|(_, r)| match r {
            Some(Ok(reply)) if matches!(reply.kind, ResponseKind::Values { .. }) => {
                Some(ValueBlocks::new(&reply.bytes).peekable())
            }
            // A failed server's keys are misses.
            _ => None,
        })
        .collect();
    let mut hits = 0;
    for (key, &p) in req.keys(&slot.frame).zip(slot.key_parts.iter()) {
        let p = p as usize;
        let Some(Some(cursor)) = cursors.get_mut(p) else {
            continue;
        };
        let Some(b) = cursor.peek() else { continue };
        if b.header.key == key {
            if let (_, Some(Ok(reply))) = &parts[p] {
                out.put_bytes(reply.bytes.slice(b.start..b.end));
                hits += 1;
            }
            cursor.next();
        }
    }
    out.put_slice(END);
    hits
}
