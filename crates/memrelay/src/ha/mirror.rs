//! Background writes nobody waits for: the unlink that follows a `set`
//! refused for size, and the deletes that undo a read repair that may be
//! older than a write. Writes' mirrors and read repairs (classic and `mg`)
//! are not here: the client's reply waits for those (see `ha::write`,
//! `ha::read`, `ha::meta_read`).
//!
//! Each one registers a small
//! context (the key, as a slice of the request's frame: no copy) in a
//! reusable table, and its reply is checked here:
//! - a server that failed a background write is recorded as having missed
//!   the key (it will be invalidated there before serving it again);
//! - a server that refused one has its copy deleted.
//!
//! (A backup whose `incr` answer differs from the primary's is handled
//! where the client's reply waits for it, in `ha::write`.)

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use memrelay_protocol::{Expect, ResponseKind};

use super::replica::Server;
use super::Pool;
use crate::backend::{BackendResult, ReplyTo, ServerPool, Sink};
use crate::stats::WorkerStats;

#[derive(Debug)]
struct Ctx {
    key: Bytes,
    server: usize,
}

#[derive(Debug)]
pub(crate) struct Mirror<P: Pool = ServerPool> {
    me: Weak<Mirror<P>>,
    servers: Rc<[Server<P>]>,
    stats: Arc<WorkerStats>,
    ctxs: RefCell<Vec<Option<Ctx>>>,
    free: RefCell<Vec<u32>>,
}

impl<P: Pool> Mirror<P> {
    pub(crate) fn new(servers: Rc<[Server<P>]>, stats: Arc<WorkerStats>) -> Rc<Mirror<P>> {
        Rc::new_cyclic(|me| Mirror {
            me: me.clone(),
            servers,
            stats,
            ctxs: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
        })
    }

    /// Sends a background write for `key` to `server`.
    pub(crate) fn send(
        &self,
        server: usize,
        key: Bytes,
        expect: Expect,
        write: impl FnOnce(&mut BytesMut),
        value: Option<Bytes>,
    ) {
        let Some(me) = self.me.upgrade() else { return };
        let token = {
            let mut ctxs = self.ctxs.borrow_mut();
            let ctx = Ctx {
                key: key.clone(),
                server,
            };
            match self.free.borrow_mut().pop() {
                Some(i) => {
                    ctxs[i as usize] = Some(ctx);
                    i
                }
                None => {
                    ctxs.push(Some(ctx));
                    (ctxs.len() - 1) as u32
                }
            }
        };
        let reply = ReplyTo {
            sink: me as Rc<dyn Sink>,
            token: u64::from(token),
            part: 0,
        };
        if let Err(e) = self.servers[server].send_for_key(&key, expect, reply, write, value) {
            // Never queued: settle it now as a failure.
            self.deliver(u64::from(token), 0, Err(e));
        }
    }

    /// Deletes `key` on `server` in the background.
    /// Deletes `key` on `server` in the background (as `md <base64> b` when
    /// the key cannot be written in a classic command).
    pub(crate) fn delete(&self, server: usize, key: Bytes) {
        let k = key.clone();
        self.send(
            server,
            key,
            super::delete_expect(&k),
            |b| super::write_delete(b, &k),
            None,
        );
    }
}

impl<P: Pool> Sink for Mirror<P> {
    fn deliver(&self, token: u64, _part: u32, result: BackendResult) {
        let ctx = {
            let mut ctxs = self.ctxs.borrow_mut();
            let Some(slot) = ctxs.get_mut(token as usize) else {
                return;
            };
            let Some(ctx) = slot.take() else { return };
            self.free.borrow_mut().push(token as u32);
            ctx
        };
        let health = self.servers[ctx.server].health();
        match result {
            Err(e) => {
                self.stats.mirror_failures.incr();
                health.missed.record_failed(&ctx.key, e.sent);
            }
            Ok(r) if r.kind == ResponseKind::Error => {
                // The backup refused: its copy can no longer be trusted.
                self.stats.mirror_failures.incr();
                self.delete(ctx.server, ctx.key);
            }
            Ok(_) => {}
        }
    }
}
