//! Background writes nobody waits for: the unlink that follows a `set`
//! refused for size, and the repair after an `mg` fallback (the backup's
//! item fetched with its flags and TTL, then added to the primary). Writes'
//! mirrors and classic read repairs are not here: the client's reply waits
//! for those (see `ha::write`, `ha::read`).
//!
//! Each one registers a small
//! context (the key, as a slice of the request's frame: no copy) in a
//! reusable table, and its reply is checked here:
//! - a backup that failed or refused a mirror is recorded as having missed
//!   the key (it will be invalidated there before serving it again);
//! - a backup whose answer differs from the primary's (an `incr` giving
//!   another number) has its copy deleted, so it holds the primary's item
//!   or nothing, never a different value;
//! - a read repair (`add` to the primary) is counted as done or as skipped
//!   because a newer value got there first.

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use memrelay_protocol::{base64, compose, Command, Expect, MetaStatus, ResponseKind};

use crate::backend::{BackendResult, ReplyTo, ServerPool, Sink};
use crate::stats::WorkerStats;

/// What a background write's reply must look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Any non-error answer is fine (set, delete, touch, append...).
    Applied,
    /// `incr`/`decr`: the backup must reach the primary's number.
    Number(u64),
    /// A read repair on the primary; `epoch`: the primary's missed-key
    /// epoch before the backup was read (see `ha::read::after_repair`: a
    /// record since undoes the copy).
    Repair { epoch: u64 },
    /// Step one of a meta read repair: the backup's item (value, flags,
    /// TTL) is fetched, then added to this primary.
    RepairFetch { primary: u16, epoch: u64 },
}

#[derive(Debug)]
struct Ctx {
    key: Bytes,
    server: usize,
    check: Check,
}

#[derive(Debug)]
pub struct Mirror {
    me: Weak<Mirror>,
    servers: Rc<[Rc<ServerPool>]>,
    stats: Arc<WorkerStats>,
    ctxs: RefCell<Vec<Option<Ctx>>>,
    free: RefCell<Vec<u32>>,
}

impl Mirror {
    pub fn new(servers: Rc<[Rc<ServerPool>]>, stats: Arc<WorkerStats>) -> Rc<Mirror> {
        Rc::new_cyclic(|me| Mirror {
            me: me.clone(),
            servers,
            stats,
            ctxs: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
        })
    }

    /// Sends a background write for `key` to `server`.
    pub fn send(
        &self,
        server: usize,
        key: Bytes,
        check: Check,
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
                check,
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
    pub fn delete(&self, server: usize, key: Bytes) {
        let k = key.clone();
        self.send(
            server,
            key,
            Check::Applied,
            super::delete_expect(&k),
            |b| super::write_delete(b, &k),
            None,
        );
    }

    /// Copies `key` from `backup` to `primary` if the primary has no value
    /// for it by then (meta reads, whose reply may not carry what a repair
    /// needs: value, flags and TTL).
    pub fn repair_from(&self, backup: usize, primary: usize, key: Bytes) {
        let k = key.clone();
        let check = Check::RepairFetch {
            primary: primary as u16,
            epoch: self.servers[primary].health().missed.epoch(),
        };
        if super::is_text_key(&k) {
            self.send(
                backup,
                key,
                check,
                Expect::Meta,
                |b| compose::meta_get(b, &k, b"v f t", None),
                None,
            );
        } else {
            let enc = encode(&k);
            self.send(
                backup,
                key,
                check,
                Expect::Meta,
                |b| compose::meta_get(b, &enc, b"b v f t", None),
                None,
            );
        }
    }

    /// Step two of `repair_from`: add the fetched item to the primary
    /// (mode E: only if it still has none).
    fn repair_store(&self, primary: usize, key: Bytes, reply: &Bytes, epoch: u64) {
        // A write that went past the primary meanwhile (and recorded it as
        // missing the key) may have changed the backup after this read.
        if !self.servers[primary].health().serves(&key) {
            self.stats.repairs_skipped.incr();
            return;
        }
        let mf = memrelay_protocol::meta_flags(reply);
        let Some((off, len)) = mf.data else { return };
        let Some(ttl) = super::exptime_from_ttl(mf.ttl) else {
            return;
        };
        let mut flags = format!("F{} T{} ME", mf.flags.unwrap_or(0), ttl).into_bytes();
        let value = reply.slice(off..off + len);
        let wire = if super::is_text_key(&key) {
            key.to_vec()
        } else {
            flags.extend_from_slice(b" b");
            encode(&key)
        };
        self.send(
            primary,
            key,
            Check::Repair { epoch },
            Expect::Meta,
            |b| compose::meta_line(b, Command::MetaSet, &wire, Some(len), &flags),
            Some(value),
        );
    }
}

fn encode(key: &[u8]) -> Vec<u8> {
    let mut enc = Vec::with_capacity(key.len() * 4 / 3 + 4);
    base64::encode(key, &mut enc);
    enc
}

impl Sink for Mirror {
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
        match (ctx.check, result) {
            (Check::Repair { epoch }, result) => {
                // As `read::after_repair`: an add whose outcome is unknown
                // may have landed; a copy that may be older than a write
                // that went past the primary since the backup was read is
                // deleted, on the connection the add took.
                let landed = match &result {
                    Ok(r) => matches!(
                        r.kind,
                        ResponseKind::Stored | ResponseKind::Meta(MetaStatus::Hd)
                    ),
                    Err(_) => true,
                };
                if landed && health.missed.epoch() != epoch {
                    self.stats.repairs_skipped.incr();
                    self.delete(ctx.server, ctx.key);
                } else if landed && result.is_ok() {
                    self.stats.repairs.incr();
                } else {
                    self.stats.repairs_skipped.incr();
                }
            }
            (Check::RepairFetch { primary, epoch }, Ok(r)) => {
                // Only from a backup that may still serve the key.
                if !health.serves(&ctx.key) {
                    self.stats.repairs_skipped.incr();
                } else if r.kind == ResponseKind::Meta(MetaStatus::Value) {
                    self.repair_store(primary as usize, ctx.key, &r.bytes, epoch);
                }
            }
            (Check::RepairFetch { .. }, Err(_)) => {}
            (_, Err(_)) => {
                self.stats.mirror_failures.incr();
                health.missed.record(&ctx.key);
            }
            (_, Ok(r)) if r.kind == ResponseKind::Error => {
                // The backup refused: its copy can no longer be trusted.
                self.stats.mirror_failures.incr();
                self.delete(ctx.server, ctx.key);
            }
            (Check::Number(n), Ok(r)) => {
                if r.kind != ResponseKind::Number(n) && r.kind != ResponseKind::NotFound {
                    self.stats.mirror_mismatches.incr();
                    self.delete(ctx.server, ctx.key);
                }
            }
            (Check::Applied, Ok(_)) => {}
        }
    }
}
