//! Turning one client request into the sub-requests sent to servers.
//!
//! Single-key commands go to the key's server as one request line (and the
//! value, by reference). A multi-get is split by server, one `get` per
//! server with that server's keys in request order; if every key lives on
//! one server the whole request goes there unchanged. `flush_all` goes to
//! every server. Commands the proxy answers itself (`version`, `stats`,
//! `verbosity`, `mn`, `quit`) become local replies, queued in order like the
//! rest.

use std::rc::Rc;

use bytes::Bytes;
use memrelay_protocol::{compose, Command, Expect, Request};

use super::session::{Inbox, Local, Parts, Slot};
use super::Worker;
use crate::backend::{BackendError, ReplyTo, Sink};

/// memcached's answer to `version`, with ours after it: clients parse the
/// leading memcached version to pick protocol features; operators see ours.
pub const VERSION_REPLY: &[u8] =
    concat!("VERSION 1.6.0-memrelay-", env!("CARGO_PKG_VERSION"), "\r\n").as_bytes();

fn reply_to(inbox: &Rc<Inbox>, seq: u64, part: u32) -> ReplyTo {
    ReplyTo {
        sink: inbox.clone() as Rc<dyn Sink>,
        token: seq,
        part,
    }
}

/// Builds the slot for a parsed request, sending its sub-requests.
pub fn dispatch(w: &Worker, inbox: &Rc<Inbox>, seq: u64, frame: Bytes, req: Request) -> Slot {
    let mut slot = Slot {
        frame,
        req: Some(req),
        pending: 0,
        parts: Parts::None,
        key_parts: Vec::new(),
        local: None,
    };
    match req.command {
        Command::Get | Command::Gets | Command::Gat | Command::Gats => {
            retrieval(w, inbox, seq, &mut slot, &req)
        }
        Command::Set
        | Command::Add
        | Command::Replace
        | Command::Append
        | Command::Prepend
        | Command::Cas => {
            w.stats.cmd_set.incr();
            let value = slot.frame.slice(req.value.start as usize..req.value.end());
            let frame = slot.frame.clone();
            let key = req.key.of(&frame);
            single(
                w,
                inbox,
                seq,
                &mut slot,
                key,
                Expect::Storage,
                Some(value),
                |b| {
                    compose::storage_line(
                        b,
                        req.command,
                        key,
                        req.flags,
                        req.exptime,
                        req.value.len as usize,
                        req.cas,
                    )
                },
            );
        }
        Command::Delete => {
            w.stats.cmd_delete.incr();
            let frame = slot.frame.clone();
            let key = req.key.of(&frame);
            single(w, inbox, seq, &mut slot, key, Expect::Delete, None, |b| {
                compose::delete(b, key)
            });
        }
        Command::Incr | Command::Decr => {
            if req.command == Command::Incr {
                w.stats.cmd_incr.incr();
            } else {
                w.stats.cmd_decr.incr();
            }
            let frame = slot.frame.clone();
            let key = req.key.of(&frame);
            single(w, inbox, seq, &mut slot, key, Expect::Arith, None, |b| {
                compose::arith(b, req.command, key, req.delta)
            });
        }
        Command::Touch => {
            w.stats.cmd_touch.incr();
            let frame = slot.frame.clone();
            let key = req.key.of(&frame);
            single(w, inbox, seq, &mut slot, key, Expect::Touch, None, |b| {
                compose::touch(b, key, req.exptime)
            });
        }
        Command::FlushAll => {
            w.stats.cmd_flush.incr();
            let delay = req.has_delay.then_some(req.exptime);
            let mut parts = Vec::with_capacity(w.servers.len());
            for (i, server) in w.servers.iter().enumerate() {
                let r = server.send(
                    Expect::Ok,
                    reply_to(inbox, seq, i as u32),
                    |b| compose::flush_all(b, delay),
                    None,
                );
                parts.push((server.index, r.err().map(Err)));
            }
            slot.pending = parts.iter().filter(|p| p.1.is_none()).count() as u32;
            slot.parts = Parts::Many(parts);
        }
        Command::Version => slot.local = Some(Local::Static(VERSION_REPLY)),
        Command::Verbosity => {
            slot.local = Some(Local::Static(if req.noreply { b"" } else { b"OK\r\n" }))
        }
        Command::Quit => slot.local = Some(Local::Close(b"")),
        Command::MetaNoop => slot.local = Some(Local::Static(b"MN\r\n")),
        Command::Stats => slot.local = Some(stats(w, &slot.frame, &req)),
    }
    slot
}

/// A request for one key's server.
#[allow(clippy::too_many_arguments)]
fn single(
    w: &Worker,
    inbox: &Rc<Inbox>,
    seq: u64,
    slot: &mut Slot,
    key: &[u8],
    expect: Expect,
    value: Option<Bytes>,
    write: impl FnOnce(&mut bytes::BytesMut),
) {
    let server = w.router.primary(key);
    let r = w.servers[server].send(expect, reply_to(inbox, seq, 0), write, value);
    settle(slot, server, r);
}

/// Records a sub-request that was queued (wait for it) or failed at once.
fn settle(slot: &mut Slot, server: usize, r: Result<(), BackendError>) {
    match r {
        Ok(()) => {
            slot.pending = 1;
            slot.parts = Parts::One(server, None);
        }
        Err(e) => slot.parts = Parts::One(server, Some(Err(e))),
    }
}

fn retrieval(w: &Worker, inbox: &Rc<Inbox>, seq: u64, slot: &mut Slot, req: &Request) {
    let frame = slot.frame.clone();
    let cmd = req.command;
    let exptime = req.exptime;
    if req.nkeys == 0 {
        slot.local = Some(Local::Static(b"END\r\n"));
        return;
    }
    if req.nkeys == 1 {
        let key = req.key.of(&frame);
        let server = w.router.primary(key);
        let r = w.servers[server].send(
            Expect::Retrieval,
            reply_to(inbox, seq, 0),
            |b| compose::retrieval(b, cmd, exptime, [key]),
            None,
        );
        return settle(slot, server, r);
    }
    // Several keys: group them by server, keeping request order per server.
    let mut servers: Vec<usize> = Vec::new();
    let mut key_parts: Vec<u16> = Vec::with_capacity(req.nkeys as usize);
    for key in req.keys(&frame) {
        let s = w.router.primary(key);
        let p = match servers.iter().position(|&x| x == s) {
            Some(p) => p,
            None => {
                servers.push(s);
                servers.len() - 1
            }
        };
        key_parts.push(p as u16);
    }
    if servers.len() == 1 {
        let server = servers[0];
        let r = w.servers[server].send(
            Expect::Retrieval,
            reply_to(inbox, seq, 0),
            |b| compose::retrieval(b, cmd, exptime, req.keys(&frame)),
            None,
        );
        return settle(slot, server, r);
    }
    let mut parts = Vec::with_capacity(servers.len());
    for (p, &server) in servers.iter().enumerate() {
        let keys = req
            .keys(&frame)
            .zip(key_parts.iter())
            .filter(|(_, &kp)| kp as usize == p)
            .map(|(k, _)| k);
        let r = w.servers[server].send(
            Expect::Retrieval,
            reply_to(inbox, seq, p as u32),
            |b| compose::retrieval(b, cmd, exptime, keys),
            None,
        );
        parts.push((server, r.err().map(Err)));
    }
    slot.pending = parts.iter().filter(|p| p.1.is_none()).count() as u32;
    slot.parts = Parts::Many(parts);
    slot.key_parts = key_parts;
}

/// memcached unlinks a key whose `set` failed for size, so the old value
/// does not outlive a failed overwrite; do the same on the key's server.
pub fn unlink(w: &Worker, key: &[u8]) {
    if key.is_empty() || key.len() > memrelay_protocol::KEY_MAX_LENGTH {
        return;
    }
    let server = w.router.primary(key);
    let sink = ReplyTo {
        sink: w.discard.clone() as Rc<dyn Sink>,
        token: 0,
        part: 0,
    };
    let _ = w.servers[server].send(Expect::Delete, sink, |b| compose::delete(b, key), None);
}

/// `stats`, `stats reset`, `stats servers`; anything else is memcached's
/// `ERROR` for an unknown stats group.
fn stats(w: &Worker, frame: &[u8], req: &Request) -> Local {
    let args = req.args.of(frame);
    let sub = args
        .split(|&b| b == b' ')
        .find(|t| !t.is_empty())
        .unwrap_or(b"");
    match sub {
        b"" | b"servers" => Local::Owned(w.registry.render()),
        b"reset" => {
            w.registry.reset();
            Local::Static(b"RESET\r\n")
        }
        _ => Local::Static(b"ERROR\r\n"),
    }
}
