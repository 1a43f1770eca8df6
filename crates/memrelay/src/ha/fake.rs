//! A fake server pool, for the in-process tests of the HA steps.
//!
//! The process tests (tests/ha*.rs) run the HA contract against real
//! memcached processes; these run the same steps (`ha::read`,
//! `ha::meta_read`, `ha::write`, through `ha::flow`) with no process and
//! on tokio's paused clock, so a test can place each server's answer in
//! time exactly. A real server cannot be paused between two requests of
//! one connection; this fake can.
//!
//! [`FakePool`] is a tiny memcached: items in a map, the classic storage,
//! retrieval, `incr`/`decr` and delete commands, and `mg` with the flags
//! the HA steps ask for. It applies a request when it is sent (in send order, as one
//! connection would), keeps the request lines in a log, and delivers the
//! answer `latency` later. It can be told to fail every request, as a
//! server that refuses connections.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use memrelay_protocol::Expect;

use super::flow::Flow;
use super::replica::{Replica, Server};
use super::slot::Slot;
use super::{Cluster, Pool};
use crate::backend::{BackendError, BackendReply, BackendResult, Failure, ReplyTo, Sink};

/// One item of the fake's store.
#[derive(Debug, Clone)]
struct Item {
    flags: u32,
    value: Vec<u8>,
    cas: u64,
}

/// A fake memcached behind a fake pool (see the module's doc).
#[derive(Debug)]
pub(crate) struct FakePool {
    items: RefCell<HashMap<Vec<u8>, Item>>,
    /// Every request line sent to it, in order, without its `\r\n` (when
    /// it fails requests, those it failed too).
    log: RefCell<Vec<String>>,
    /// Fail every request as a refused connection would (nothing sent).
    fails: Cell<bool>,
    /// How long after a request its answer is delivered.
    latency: Cell<Duration>,
    next_cas: Cell<u64>,
}

impl Default for FakePool {
    fn default() -> Self {
        FakePool {
            items: RefCell::default(),
            log: RefCell::default(),
            fails: Cell::new(false),
            latency: Cell::new(Duration::from_millis(1)),
            next_cas: Cell::new(1),
        }
    }
}

impl FakePool {
    /// Stores `key` = `value` directly, as if a client had set it.
    pub(crate) fn put(&self, key: &str, value: &str) {
        self.store(key.as_bytes(), 0, value.as_bytes().to_vec());
    }

    /// The value of `key`, if it holds one.
    pub(crate) fn get(&self, key: &str) -> Option<String> {
        let items = self.items.borrow();
        let item = items.get(key.as_bytes())?;
        Some(String::from_utf8_lossy(&item.value).into_owned())
    }

    /// The request lines sent to it so far.
    pub(crate) fn log(&self) -> Vec<String> {
        self.log.borrow().clone()
    }

    pub(crate) fn set_failing(&self, fails: bool) {
        self.fails.set(fails);
    }

    pub(crate) fn set_latency(&self, latency: Duration) {
        self.latency.set(latency);
    }

    fn store(&self, key: &[u8], flags: u32, value: Vec<u8>) {
        let cas = self.next_cas.get();
        self.next_cas.set(cas + 1);
        let item = Item { flags, value, cas };
        self.items.borrow_mut().insert(key.to_vec(), item);
    }

    /// What memcached would answer to `line` (with `value` for storage
    /// commands), applied to the store now.
    fn answer(&self, line: &str, value: Option<&[u8]>) -> Vec<u8> {
        let toks: Vec<&str> = line.split(' ').collect();
        match toks.as_slice() {
            ["get" | "gets", keys @ ..] => self.retrieve(keys, toks[0] == "gets"),
            ["mg", key, flags @ ..] => self.meta_get(key, flags),
            [cmd @ ("set" | "add" | "replace" | "append" | "prepend"), key, flags, ..] => {
                let data = value.unwrap_or_default().to_vec();
                let flags = flags.parse().unwrap_or(0);
                self.storage(cmd, key.as_bytes(), flags, data).to_vec()
            }
            [cmd @ ("incr" | "decr"), key, delta] => self.arith(cmd, key.as_bytes(), delta),
            ["delete", key] => match self.items.borrow_mut().remove(key.as_bytes()) {
                Some(_) => b"DELETED\r\n".to_vec(),
                None => b"NOT_FOUND\r\n".to_vec(),
            },
            _ => b"ERROR\r\n".to_vec(),
        }
    }

    fn retrieve(&self, keys: &[&str], with_cas: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let items = self.items.borrow();
        for key in keys {
            if let Some(item) = items.get(key.as_bytes()) {
                let cas = if with_cas {
                    format!(" {}", item.cas)
                } else {
                    String::new()
                };
                let len = item.value.len();
                out.extend_from_slice(
                    format!("VALUE {key} {} {len}{cas}\r\n", item.flags).as_bytes(),
                );
                out.extend_from_slice(&item.value);
                out.extend_from_slice(b"\r\n");
            }
        }
        out.extend_from_slice(b"END\r\n");
        out
    }

    fn meta_get(&self, key: &str, flags: &[&str]) -> Vec<u8> {
        let items = self.items.borrow();
        let Some(item) = items.get(key.as_bytes()) else {
            return b"EN\r\n".to_vec();
        };
        let with_value = flags.contains(&"v");
        let mut line = if with_value {
            format!("VA {}", item.value.len())
        } else {
            "HD".to_string()
        };
        for flag in flags {
            match *flag {
                "f" => line.push_str(&format!(" f{}", item.flags)),
                "t" => line.push_str(" t-1"),
                "c" => line.push_str(&format!(" c{}", item.cas)),
                _ => {}
            }
        }
        let mut out = line.into_bytes();
        out.extend_from_slice(b"\r\n");
        if with_value {
            out.extend_from_slice(&item.value);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    fn arith(&self, cmd: &str, key: &[u8], delta: &str) -> Vec<u8> {
        let old = self.items.borrow().get(key).cloned();
        let (Some(old), Ok(delta)) = (old, delta.parse::<u64>()) else {
            return b"NOT_FOUND\r\n".to_vec();
        };
        let Some(n) = std::str::from_utf8(&old.value)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        else {
            return b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n".to_vec();
        };
        let n = match cmd {
            "incr" => n.wrapping_add(delta),
            _ => n.saturating_sub(delta),
        };
        self.store(key, old.flags, n.to_string().into_bytes());
        format!("{n}\r\n").into_bytes()
    }

    fn storage(&self, cmd: &str, key: &[u8], flags: u32, data: Vec<u8>) -> &'static [u8] {
        let old = self.items.borrow().get(key).cloned();
        let new = match (cmd, old) {
            ("set", _) | ("add", None) => (flags, data),
            ("replace", Some(_)) => (flags, data),
            ("append", Some(old)) => (old.flags, [old.value, data].concat()),
            ("prepend", Some(old)) => (old.flags, [data, old.value].concat()),
            _ => return b"NOT_STORED\r\n",
        };
        self.store(key, new.0, new.1);
        b"STORED\r\n"
    }
}

impl Pool for FakePool {
    fn send(
        &self,
        expect: Expect,
        reply: ReplyTo,
        write: impl FnOnce(&mut BytesMut),
        value: Option<Bytes>,
    ) -> Result<(), BackendError> {
        let mut line = BytesMut::new();
        write(&mut line);
        let line = String::from_utf8_lossy(&line).trim_end().to_string();
        self.log.borrow_mut().push(line.clone());
        let result: BackendResult = if self.fails.get() {
            Err(BackendError::unsent(Failure::Connect))
        } else {
            let bytes = self.answer(&line, value.as_deref());
            // The kind as the real connection would frame it.
            match memrelay_protocol::parse_response(&bytes, expect, usize::MAX) {
                Ok(Some((kind, _))) => Ok(BackendReply {
                    kind,
                    bytes: Bytes::from(bytes),
                }),
                Ok(None) => Err(BackendError {
                    failure: Failure::Closed,
                    sent: true,
                }),
                Err(e) => Err(BackendError {
                    failure: Failure::Protocol(e),
                    sent: true,
                }),
            }
        };
        let latency = self.latency.get();
        tokio::task::spawn_local(async move {
            tokio::time::sleep(latency).await;
            reply.deliver(result);
        });
        Ok(())
    }

    fn send_for_key(
        &self,
        _key: &[u8],
        expect: Expect,
        reply: ReplyTo,
        write: impl FnOnce(&mut BytesMut),
        value: Option<Bytes>,
    ) -> Result<(), BackendError> {
        self.send(expect, reply, write, value)
    }

    fn poison(&self, _why: &str) {}
}

/// A cluster of fake servers: `-s` primaries then `-b` backups, as a
/// configuration of those flags would route keys.
#[allow(clippy::panic)]
pub(crate) fn cluster(args: &[&str]) -> (Cluster<FakePool>, Vec<Rc<FakePool>>) {
    use crate::config::cli::{parse_args, Action};
    let Ok(Action::Run(cfg)) = parse_args(args.iter().copied()) else {
        panic!("not a configuration: {args:?}");
    };
    let pools: Vec<Rc<FakePool>> = cfg.servers().map(|_| Rc::default()).collect();
    let servers: Rc<[Server<FakePool>]> = cfg
        .servers()
        .zip(&pools)
        .map(|(s, pool)| Server::new(pool.clone(), Arc::new(Replica::new(s.name.clone(), 16, 1))))
        .collect();
    let stats = Arc::new(crate::stats::WorkerStats::default());
    let cluster = Cluster {
        router: crate::router::Router::new(&cfg),
        mirror: super::mirror::Mirror::new(servers.clone(), stats.clone()),
        servers,
        miss_fallback: cfg.miss_fallback,
        auto_eject: cfg.auto_eject,
        stats,
        transition: None,
    };
    (cluster, pools)
}

/// Where a test's server replies go: kept until the test takes them
/// ([`Replies::take`]) and gives each to its slot.
#[derive(Debug, Default)]
pub(crate) struct Replies {
    got: RefCell<Vec<(u64, u32, BackendResult)>>,
    came: tokio::sync::Notify,
}

impl Sink for Replies {
    fn deliver(&self, token: u64, part: u32, result: BackendResult) {
        self.got.borrow_mut().push((token, part, result));
        self.came.notify_one();
    }
}

impl Replies {
    /// Waits until replies came, and takes them: (token, part, result).
    pub(crate) async fn take(&self) -> Vec<(u64, u32, BackendResult)> {
        loop {
            let got = std::mem::take(&mut *self.got.borrow_mut());
            if !got.is_empty() {
                return got;
            }
            self.came.notified().await;
        }
    }
}

/// Runs one request's flow to its end: its first step (`start`), then
/// each next step as the fake servers answer.
pub(crate) async fn run_one(f: &Flow<'_, Replies, FakePool>, slot: &mut Slot) {
    super::flow::run(f, slot);
    while !slot.is_done() {
        for (_, part, result) in f.inbox.take().await {
            slot.fill(part, result);
        }
        super::flow::run(f, slot);
    }
}

/// A request as the session would have parsed it: its frame and itself.
#[allow(clippy::panic)]
pub(crate) fn request(line: &str) -> (Bytes, memrelay_protocol::Request) {
    let frame = Bytes::copy_from_slice(line.as_bytes());
    match memrelay_protocol::parse_request(&frame, &memrelay_protocol::Limits::default()) {
        Ok(Some((req, n))) if n == frame.len() => (frame, req),
        other => panic!("not one request: {line:?} {other:?}"),
    }
}
