//! Turning one client request into its first sub-requests, and moving it
//! through its later stages.
//!
//! Keyed commands go to the HA layer (`ha::read`, `ha::meta_read`,
//! `ha::write`), which picks replicas. `flush_all` goes to every server.
//! Commands the proxy answers itself (`version`, `stats`, `verbosity`,
//! `mn`, `quit`) become local replies, queued in order like the rest.

use std::rc::Rc;

use bytes::Bytes;
use memrelay_protocol::{compose, Command, Expect, Request, ResponseKind};

use super::session::Inbox;
use super::slot::{Local, Part, Slot};
use super::Worker;
use crate::backend::BackendReply;
use crate::ha;
use crate::ha::flow::{Flow, Kind};

/// memcached's answer to `version`, with ours after it: clients parse the
/// leading memcached version to pick protocol features; operators see ours.
pub(crate) const VERSION_REPLY: &[u8] =
    concat!("VERSION 1.6.0-memrelay-", env!("CARGO_PKG_VERSION"), "\r\n").as_bytes();

/// Builds the slot for a parsed request and sends its first sub-requests.
pub(crate) fn start(w: &Worker, inbox: &Rc<Inbox>, seq: u64, frame: Bytes, req: Request) -> Slot {
    let mut slot = Slot::new(frame, req);
    let f = &Flow { w, inbox, seq, req };
    if let Some(kind) = Kind::of(req.command) {
        match kind {
            // A classic read's keys are counted as it is answered.
            Kind::Read => {}
            Kind::MetaRead => w.stats.cmd_get.incr(),
            Kind::Write => count_write(w, req.command),
        }
        ha::flow::start(f, &mut slot, kind);
        return slot;
    }
    match req.command {
        Command::FlushAll if !w.flush_enabled => {
            // It would wipe every server behind the proxy: only when the
            // operator allowed it. memcached's words when run with -F.
            w.stats.cmd_flush.incr();
            slot.local = Some(Local::Static(if req.noreply {
                b""
            } else {
                b"CLIENT_ERROR flush_all not allowed\r\n"
            }));
        }
        Command::FlushAll => {
            w.stats.cmd_flush.incr();
            let delay = req.has_delay.then_some(req.exptime);
            for (i, server) in w.servers.iter().enumerate() {
                let queued = server.send(
                    Expect::Ok,
                    f.reply_to(i),
                    |b| compose::flush_all(b, delay),
                    None,
                );
                slot.push_part(Part::new(i), queued);
            }
        }
        Command::Version => slot.local = Some(Local::Static(VERSION_REPLY)),
        Command::Verbosity => {
            slot.local = Some(Local::Static(if req.noreply { b"" } else { b"OK\r\n" }))
        }
        Command::Quit => slot.local = Some(Local::Close(b"")),
        Command::MetaNoop => slot.local = Some(Local::Static(b"MN\r\n")),
        Command::Stats => slot.local = Some(stats(w, &slot.frame, &req)),
        Command::Admin => admin(w, f, &mut slot),
        // Keyed commands: `ha::flow` above.
        _ => {}
    }
    slot
}

fn count_write(w: &Worker, command: Command) {
    let counter = match command {
        Command::Delete | Command::MetaDelete => &w.stats.cmd_delete,
        Command::Incr | Command::MetaArith => &w.stats.cmd_incr,
        Command::Decr => &w.stats.cmd_decr,
        Command::Touch => &w.stats.cmd_touch,
        _ => &w.stats.cmd_set,
    };
    counter.incr();
}

/// All of a slot's parts are in: take its next steps (`ha::flow::run`)
/// until it waits for servers again or is done.
pub(crate) fn advance(w: &Worker, inbox: &Rc<Inbox>, seq: u64, slot: &mut Slot) {
    if !slot.wants_step() {
        return;
    }
    // (A slot without a request is a local reply: it is done already.)
    let Some(req) = slot.req else {
        return;
    };
    let f = Flow { w, inbox, seq, req };
    ha::flow::run(&f, slot);
}

/// memcached unlinks a key whose `set` failed for size, so the old value
/// does not outlive a failed overwrite; do the same on every replica.
pub(crate) fn unlink(w: &Worker, frame: &Bytes, key: &[u8]) {
    if key.is_empty() || key.len() > memrelay_protocol::KEY_MAX_LENGTH {
        return;
    }
    let key_bytes = frame.slice_ref(key);
    for server in w.router.replicas(key).iter() {
        w.mirror.delete(server, key_bytes.clone());
    }
}

/// `memrelay <subcommand>`: the proxy's own administration.
/// - `memrelay resync <host:port>`: copy that server's items back from the
///   other tier (a primary from the backups, a backup from the primaries);
/// - `memrelay reload`: read the configuration again, as SIGHUP does; the
///   answer (`OK`, or `SERVER_ERROR reload failed: <why>`) comes once every
///   worker runs the new configuration, or the old one is kept.
fn admin(w: &Worker, f: &Flow<'_, Inbox>, slot: &mut Slot) {
    let req = &f.req;
    let args = req.args.of(&slot.frame);
    let mut toks = args.split(|&b| b == b' ').filter(|t| !t.is_empty());
    let local = match (toks.next(), toks.next(), toks.next()) {
        (Some(b"resync"), Some(name), None) => resync(w, name),
        (Some(b"reload"), None, None) => match reload(w, f) {
            Ok(()) => {
                slot.push_part(Part::new(0), Ok(()));
                return;
            }
            Err(reply) => reply,
        },
        _ => {
            Local::Static(b"CLIENT_ERROR usage: memrelay resync <host:port> | memrelay reload\r\n")
        }
    };
    slot.local = Some(local);
}

fn resync(w: &Worker, name: &[u8]) -> Local {
    let Some(requests) = &w.resync else {
        return Local::Static(b"CLIENT_ERROR nothing to resync from: no backups configured\r\n");
    };
    let Some(server) = w.servers.iter().find(|s| s.name.as_bytes() == name) else {
        return Local::Static(b"CLIENT_ERROR no such server (use host:port as configured)\r\n");
    };
    if !w.admin.resync_due(&server.name) {
        return Local::Static(b"OK\r\n");
    }
    let request = crate::ha::resync::Request::whole(server.name.clone(), false);
    match requests.send(request) {
        Ok(()) => Local::Static(b"OK\r\n"),
        Err(_) => Local::Static(b"SERVER_ERROR resync is not available\r\n"),
    }
}

/// Asks the main thread to reload; its answer is delivered to the slot as
/// the reply of part 0 (see `reply::render`).
fn reload(w: &Worker, f: &Flow<'_, Inbox>) -> Result<(), Local> {
    const UNAVAILABLE: &[u8] = b"SERVER_ERROR reload failed: reloading is not available\r\n";
    let Some(requests) = &w.reload else {
        return Err(Local::Static(UNAVAILABLE));
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    if requests
        .send(crate::topology::ReloadRequest { reply })
        .is_err()
    {
        return Err(Local::Static(UNAVAILABLE));
    }
    let to = f.reply_to(0);
    tokio::task::spawn_local(async move {
        let (kind, line) = match answer.await {
            Ok(Ok(())) => (ResponseKind::Ok, "OK\r\n".to_string()),
            // The reason names files and hosts: it is in the log, and a
            // client is told only that the configuration was refused.
            Ok(Err(_)) => (
                ResponseKind::Error,
                "SERVER_ERROR reload failed: the configuration was refused (see the log)\r\n"
                    .to_string(),
            ),
            Err(_) => (
                ResponseKind::Error,
                String::from_utf8_lossy(UNAVAILABLE).into(),
            ),
        };
        to.deliver(Ok(BackendReply {
            kind,
            bytes: Bytes::from(line),
        }));
    });
    Ok(())
}

/// `stats`, `stats reset`, `stats servers`; the other groups are
/// `crate::stats::groups`'.
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
        group => Local::Owned(crate::stats::groups::reply(&w.registry, group)),
    }
}
