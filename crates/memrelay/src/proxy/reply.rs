//! Turning a finished request into the bytes its client gets.
//!
//! Server replies are forwarded as the bytes the server sent, by reference,
//! whenever they are exactly what the client should see; reads are rebuilt
//! only when they were spread over servers or rounds (`ha::read::render`).

use memrelay_protocol::{Command, ResponseKind};

use super::slot::{Local, Slot};
use super::Worker;
use crate::ha;
use crate::net::outqueue::OutQueue;

/// Appends the slot's reply to `out`. Returns true if the connection must
/// be closed after it.
pub(crate) fn render(w: &Worker, slot: Slot, out: &mut OutQueue) -> bool {
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
    w.stats.latency[crate::stats::command_class(req.command)].record(slot.started.elapsed());
    match req.command {
        Command::Get | Command::Gets | Command::Gat | Command::Gats => {
            ha::read::render(w, &slot, &req, out)
        }
        Command::FlushAll => flush_all(w, &slot, &req, out),
        // `memrelay reload`: the main thread's answer, as it came.
        Command::Admin => {
            if let Some(Some(Ok(reply))) = slot.parts.first().map(|p| &p.result) {
                out.put_bytes(reply.bytes.clone());
            }
        }
        Command::MetaGet | Command::MetaDebug => ha::read::render_meta(w, &slot, &req, out),
        _ => {
            // Writes: the answer of the replica that took it last.
            if req.noreply {
                return false;
            }
            match ha::write::answer(&slot) {
                Some((Ok(reply), from_mirror)) => {
                    if reply.kind == ResponseKind::Error {
                        w.stats.server_errors.incr();
                    }
                    if req.command.is_meta() {
                        if let Some(b) =
                            ha::write::meta_reply_bytes(&slot, &req, reply, from_mirror)
                        {
                            let server = ha::server_of(&slot, reply);
                            out.put_bytes(ha::read::with_cas_token(w, &slot, &req, server, b));
                        }
                    } else {
                        out.put_bytes(reply.bytes.clone());
                    }
                }
                Some((Err(e), _)) => {
                    w.stats.server_errors.incr();
                    out.put_slice(e.reply())
                }
                None => out.put_slice(ha::write::NO_SERVER),
            }
        }
    }
    false
}

/// Every server must say OK; otherwise the first refusal or failure.
fn flush_all(w: &Worker, slot: &Slot, req: &memrelay_protocol::Request, out: &mut OutQueue) {
    for part in &slot.parts {
        let missed = &w.servers[part.server as usize].health().missed;
        match &part.result {
            // Flushed now: nothing on it can be stale any more.
            Some(Ok(reply)) if reply.kind == ResponseKind::Ok && !req.has_delay => missed.clear(),
            Some(Ok(reply)) if reply.kind == ResponseKind::Ok => {}
            // It missed the flush: everything on it is stale.
            _ => missed.record_all(),
        }
    }
    if req.noreply {
        return;
    }
    for part in &slot.parts {
        match &part.result {
            Some(Ok(reply)) if reply.kind == ResponseKind::Ok => {}
            Some(Ok(reply)) => return out.put_bytes(reply.bytes.clone()),
            Some(Err(e)) => return out.put_slice(e.reply()),
            None => return out.put_slice(b"SERVER_ERROR internal error: missing reply\r\n"),
        }
    }
    out.put_slice(b"OK\r\n");
}
