//! The ordering rule: a connection's requests take effect in request order
//! on every replica.
//!
//! With backups, a request has legs sent *after* a server answered: the
//! copy of a write that depends on the primary's answer, a read's fallback
//! to the backup and its repair of the primary, the delete that undoes a
//! backup's copy that disagreed. A later request of the same connection
//! dispatched meanwhile would overtake them on the servers (a pipelined
//! `append K` then `set K` left the backup with the set's value plus the
//! append). So a request that shares a key with an earlier request of its
//! connection that is not finished (all its legs answered) waits until that
//! one is; the requests after it wait too, as they would behind a full
//! pipeline, so the connection's order is kept on the wire. `flush_all`
//! waits for every earlier request and holds every later one.
//!
//! This is the one place that decides it: the session asks [`Fences`]
//! before dispatching a request ([`Fences::blocks`]), tells it each request
//! it dispatched ([`Fences::dispatched`]: its keys are held while it is
//! unfinished) and each step a request took ([`Fences::finished`]: they are
//! released once it is). Without backups a request has one leg, on one
//! connection per key, whose order is already the connection's: nothing is
//! held. Keys are compared by a 64-bit hash; a collision only makes a
//! request wait for one it did not need to.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use memrelay_protocol::{Command, Request};

use super::slot::Queued;

/// The keys a connection's unfinished requests hold.
#[derive(Debug, Default)]
pub(crate) struct Fences {
    /// Key hash -> unfinished requests holding it.
    held: HashMap<u64, u32, BuildHasherDefault<Prehashed>>,
    /// Unfinished requests that hold every key (`flush_all`).
    all: u32,
}

/// What a request holds while it is unfinished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Nothing: the proxy answers it itself, or it touches no key.
    None,
    /// Its key or keys.
    Keys,
    /// Every key (`flush_all`).
    All,
}

pub(crate) fn scope(req: &Request) -> Scope {
    match req.command {
        Command::FlushAll => Scope::All,
        Command::Version
        | Command::Verbosity
        | Command::Quit
        | Command::MetaNoop
        | Command::Stats
        | Command::Admin => Scope::None,
        _ => Scope::Keys,
    }
}

impl Fences {
    /// `q` was dispatched (and taken as far as it goes without waiting):
    /// with backups, an unfinished request holds its keys.
    pub(crate) fn dispatched(&mut self, q: &mut Queued, backups: bool) {
        if q.is_done() || !backups {
            return;
        }
        if let Some(req) = &q.slot.req {
            self.hold(&q.slot.frame, req);
            q.fenced = true;
        }
    }

    /// `q` took a step: once it is finished, the keys it held are released.
    /// Returns true if it released them (a request waiting on them may go).
    pub(crate) fn finished(&mut self, q: &mut Queued) -> bool {
        if !q.fenced || !q.is_done() {
            return false;
        }
        q.fenced = false;
        if let Some(req) = &q.slot.req {
            self.release(&q.slot.frame, req);
        }
        true
    }

    /// Whether `req` (parsed from `frame`) must wait for an earlier,
    /// unfinished request.
    pub(crate) fn blocks(&self, frame: &[u8], req: &Request) -> bool {
        if self.held.is_empty() && self.all == 0 {
            return false;
        }
        match scope(req) {
            Scope::None => false,
            Scope::All => true,
            Scope::Keys => self.all > 0 || any_key(frame, req, |h| self.held.contains_key(&h)),
        }
    }

    /// `req` was dispatched and is not finished: hold its keys.
    fn hold(&mut self, frame: &[u8], req: &Request) {
        match scope(req) {
            Scope::None => {}
            Scope::All => self.all += 1,
            Scope::Keys => {
                any_key(frame, req, |h| {
                    *self.held.entry(h).or_insert(0) += 1;
                    false
                });
            }
        }
    }

    /// `req`, held by [`hold`](Self::hold), is finished.
    fn release(&mut self, frame: &[u8], req: &Request) {
        match scope(req) {
            Scope::None => {}
            Scope::All => self.all = self.all.saturating_sub(1),
            Scope::Keys => {
                any_key(frame, req, |h| {
                    if let Some(n) = self.held.get_mut(&h) {
                        *n -= 1;
                        if *n == 0 {
                            self.held.remove(&h);
                        }
                    }
                    false
                });
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.held.is_empty() && self.all == 0
    }
}

/// Calls `f` with the hash of each key of `req` (as routed: a meta `b` key
/// decoded) until it returns true; returns whether it did.
fn any_key(frame: &[u8], req: &Request, mut f: impl FnMut(u64) -> bool) -> bool {
    if req.command.is_meta() {
        if req.meta.base64 {
            let raw = req.key.of(frame);
            if let Some(decoded) = memrelay_protocol::base64::decode(raw) {
                return f(hash(&decoded));
            }
        }
        return f(hash(req.key.of(frame)));
    }
    if req.nkeys > 1 {
        return req.keys(frame).any(|k| f(hash(k)));
    }
    f(hash(req.key.of(frame)))
}

/// FNV-1a: keys are short, and a collision only costs a needless wait.
fn hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The map's keys are hashes already.
#[derive(Debug, Default)]
pub(crate) struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ha::fake::{cluster, request, FakePool, Replies};
    use crate::ha::flow::{Flow, Kind};
    use crate::ha::slot::Slot;
    use memrelay_protocol::{parse_request, Limits};

    fn req(line: &[u8]) -> Request {
        parse_request(line, &Limits::default()).unwrap().unwrap().0
    }

    #[test]
    fn a_request_waits_for_an_unfinished_one_on_its_key() {
        let mut f = Fences::default();
        let (a, b, c) = (
            &b"append k 0 0 1\r\nx\r\n"[..],
            &b"set k 0 0 2\r\nv2\r\n"[..],
            &b"get other k2\r\n"[..],
        );
        assert!(!f.blocks(a, &req(a)));
        f.hold(a, &req(a));
        assert!(f.blocks(b, &req(b)), "same key");
        assert!(!f.blocks(c, &req(c)), "other keys");
        let mg = &b"mg aw== b v\r\n"[..]; // "k" in base64
        assert!(f.blocks(mg, &req(mg)), "a meta b key is compared decoded");
        let mget = &b"get z k y\r\n"[..];
        assert!(f.blocks(mget, &req(mget)), "one of several keys");
        f.release(a, &req(a));
        assert!(!f.blocks(b, &req(b)));
        assert!(f.is_empty());
    }

    #[test]
    fn flush_all_waits_for_everything_and_holds_everything() {
        let mut f = Fences::default();
        let (set, flush, ver) = (
            &b"set k 0 0 1\r\nx\r\n"[..],
            &b"flush_all\r\n"[..],
            &b"version\r\n"[..],
        );
        f.hold(set, &req(set));
        assert!(f.blocks(flush, &req(flush)));
        f.release(set, &req(set));
        f.hold(flush, &req(flush));
        assert!(f.blocks(set, &req(set)));
        assert!(!f.blocks(ver, &req(ver)), "local commands never wait");
        f.release(flush, &req(flush));
        assert!(f.is_empty());
    }

    #[test]
    fn only_an_unfinished_request_with_backups_holds_its_keys() {
        let mut f = Fences::default();
        let a = &b"append k 0 0 1\r\nx\r\n"[..];
        let queued = |line: &[u8]| {
            let mut slot = Slot::new(bytes::Bytes::copy_from_slice(line), req(line));
            // One part sent, its answer not in yet.
            slot.push_part(crate::ha::slot::Part::new(0), Ok(()));
            Queued {
                slot,
                worker: None,
                fenced: false,
                hints: (0, 0),
            }
        };
        let mut q = queued(a);
        f.dispatched(&mut q, false);
        assert!(f.is_empty(), "without backups nothing is held");
        f.dispatched(&mut q, true);
        assert!(f.blocks(a, &req(a)));
        assert!(!f.finished(&mut q), "not finished yet");
        let answer = crate::backend::BackendReply {
            kind: memrelay_protocol::ResponseKind::Stored,
            bytes: bytes::Bytes::from_static(b"STORED\r\n"),
        };
        assert!(q.slot.fill(0, Ok(answer)));
        assert!(f.finished(&mut q));
        assert!(f.is_empty());
        assert!(!f.finished(&mut q), "released once");
    }

    #[test]
    fn a_key_held_twice_is_held_until_both_finish() {
        let mut f = Fences::default();
        let g = &b"get k\r\n"[..];
        f.hold(g, &req(g));
        f.hold(g, &req(g));
        f.release(g, &req(g));
        assert!(f.blocks(g, &req(g)));
        f.release(g, &req(g));
        assert!(!f.blocks(g, &req(g)));
    }

    /// Runs writes pipelined on one connection, as the session does: each
    /// dispatched unless the fences hold it, and advanced as the fake
    /// servers answer (`ha::fake`, on tokio's paused clock). Returns the
    /// replies, in order.
    async fn pipeline(w: &crate::ha::Cluster<FakePool>, lines: &[&str]) -> String {
        let replies = std::rc::Rc::new(Replies::default());
        let mut fences = Fences::default();
        let mut slots: Vec<Queued> = Vec::new();
        let flow = |seq: usize, req| Flow {
            w,
            inbox: &replies,
            seq: seq as u64,
            req,
        };
        loop {
            while let Some(line) = lines.get(slots.len()) {
                let (frame, req) = request(line);
                if fences.blocks(&frame, &req) {
                    break;
                }
                let f = flow(slots.len(), req);
                let mut slot = Slot::new(frame, req);
                crate::ha::flow::start(&f, &mut slot, Kind::Write);
                crate::ha::flow::run(&f, &mut slot);
                let mut q = Queued {
                    slot,
                    worker: None,
                    fenced: false,
                    hints: (0, 0),
                };
                fences.dispatched(&mut q, w.router.has_backups());
                slots.push(q);
            }
            if slots.len() == lines.len() && slots.iter().all(|q| q.is_done()) {
                let mut out = crate::net::outqueue::OutQueue::new();
                for q in &slots {
                    let req = q.slot.req.unwrap();
                    crate::ha::flow::render(w, &q.slot, &req, Kind::Write, &mut out);
                }
                let mut bytes = Vec::new();
                out.write_to(|iov| {
                    iov.iter().for_each(|s| bytes.extend_from_slice(s));
                    Ok(iov.iter().map(|s| s.len()).sum())
                })
                .unwrap();
                return String::from_utf8(bytes).unwrap();
            }
            for (seq, part, result) in replies.take().await {
                let q = &mut slots[seq as usize];
                if q.slot.fill(part, result) {
                    let req = q.slot.req.unwrap();
                    crate::ha::flow::run(&flow(seq as usize, req), &mut q.slot);
                    fences.finished(q);
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn two_writes_to_one_key_reach_every_replica_in_pipeline_order() {
        tokio::task::LocalSet::new()
            .run_until(async {
                let (w, pools) = cluster(&["-s", "127.0.0.1:1", "-b", "127.0.0.1:2"]);
                for pool in &pools {
                    pool.put("k", "a");
                }
                // The append's copy leaves for the backup once the primary
                // answered; the set alone would go to both at once, and
                // reach the backup first.
                let replies =
                    pipeline(&w, &["append k 0 0 1\r\nx\r\n", "set k 0 0 2\r\nv2\r\n"]).await;
                assert_eq!(replies, "STORED\r\nSTORED\r\n");
                for pool in &pools {
                    assert_eq!(pool.log(), ["append k 0 0 1", "set k 0 0 2"]);
                    assert_eq!(pool.get("k").as_deref(), Some("v2"));
                }
            })
            .await;
    }
}
