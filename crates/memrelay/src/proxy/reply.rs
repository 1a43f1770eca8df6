//! Turning a finished request into the bytes its client gets.
//!
//! Server replies are forwarded as the bytes the server sent, by reference,
//! whenever they are exactly what the client should see; reads are rebuilt
//! only when they were spread over servers or rounds (`ha::flow::render`).

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
    let took = slot.started.elapsed();
    w.stats.latency[crate::stats::command_class(req.command)].record(took);
    if took >= SLOW_REQUEST {
        log_slow(w, &slot, &req, took);
    }
    if let Some(kind) = ha::flow::Kind::of(req.command) {
        ha::flow::render(w, &slot, &req, kind, out);
        return false;
    }
    match req.command {
        Command::FlushAll => flush_all(w, &slot, &req, out),
        // `memrelay reload`: the main thread's answer, as it came.
        Command::Admin => {
            if let Some(Some(Ok(reply))) = slot.parts.first().map(|p| &p.result) {
                out.put_bytes(reply.bytes.clone());
            }
        }
        // Local replies were written above, keyed commands by `ha::flow`.
        _ => {}
    }
    false
}

/// A request that took this long is logged (at debug level) with what
/// each of its sub-requests met: the trail of a slow answer.
const SLOW_REQUEST: std::time::Duration = std::time::Duration::from_secs(1);

fn log_slow(w: &Worker, slot: &Slot, req: &memrelay_protocol::Request, took: std::time::Duration) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let parts: Vec<String> = slot
        .parts
        .iter()
        .map(|p| {
            let outcome = match &p.result {
                None => "pending".to_string(),
                Some(Ok(r)) => format!("{:?}", r.kind),
                Some(Err(e)) => format!("{e:?}"),
            };
            let server = &w.servers[p.server as usize].health().name;
            format!("{server} {:?} {outcome}", p.role)
        })
        .collect();
    tracing::debug!(
        command = ?req.command,
        took_ms = took.as_millis() as u64,
        parts = ?parts,
        "slow request"
    );
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
