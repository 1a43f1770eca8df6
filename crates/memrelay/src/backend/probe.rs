//! The per-server watcher, on the main thread.
//!
//! - While a server is marked down nobody sends it requests, so this loop
//!   notices when it is back: it connects and asks `stats`, with jittered
//!   exponential backoff, and needs `SUCCESSES_TO_MARK_UP` good probes in a
//!   row (one lucky connect to a flapping server is not enough).
//! - Before a server serves again, and whenever it is reachable with keys
//!   recorded as missed, it invalidates those keys on it (pipelined
//!   `delete`s), or flushes it if the list overflowed: a server never serves
//!   a value older than a write it missed. A key recorded on an up server
//!   wakes it at once (the server does not serve the key until then).
//! - It remembers each server's identity (pid and boot time from `stats`):
//!   a restart is logged once and starts a resync. The missed keys are
//!   still deleted: a copy (resync, read repair) may have landed on the
//!   restarted server before a write that went past it was known.

use std::sync::Arc;
use std::time::Duration;

use super::connect::{Dial, ServerStream};
use super::health::Health;
use crate::net::read_some;
use crate::stats::servers::{Group, ServerFigures};

/// Least time between two flushes of one server after its missed-key list
/// overflowed.
const FLUSH_EVERY: Duration = Duration::from_secs(60);
const SUCCESSES_TO_MARK_UP: u32 = 2;
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often an up server is looked at: its missed keys drained, its
/// identity checked for restarts.
const WATCH_INTERVAL: Duration = Duration::from_millis(50);
const IDENTITY_INTERVAL: Duration = Duration::from_secs(1);
/// `stats items` and `stats slabs` are read every this many identity
/// checks: a few kilobytes per slab class, and they change slowly.
const SLAB_FIGURES_EVERY: u32 = 5;
/// Deletes sent per round trip while invalidating missed keys.
const DELETE_BATCH: usize = 512;
/// Reply bytes accepted from one probe read before giving up on the server.
const MAX_PROBE_REPLY: usize = 1 << 20;

/// The timeouts probes use: the proxy's `--connect-timeout` and
/// `--timeout`, which a reload may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeTimeouts {
    pub connect: Duration,
    pub request: Duration,
}

/// Who a server is: a restart changes its pid or its boot time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    pid: u64,
    boot: i64,
}

impl Identity {
    fn same_process(&self, other: &Identity) -> bool {
        // Boot time is derived from uptime, which ticks in whole seconds.
        self.pid == other.pid && (self.boot - other.boot).abs() <= 2
    }
}

/// One probe connection to a server.
struct ProbeConn {
    stream: ServerStream,
    buf: Vec<u8>,
    timeout: Duration,
}

impl ProbeConn {
    async fn open(dial: &Dial, t: ProbeTimeouts) -> std::io::Result<ProbeConn> {
        Ok(ProbeConn {
            stream: dial.connect(t.connect).await?,
            buf: Vec::new(),
            timeout: t.request,
        })
    }

    /// Sends `req` (pipelined requests ending at `ends`) and reads until
    /// `done(reply)` says the reply is complete.
    async fn exchange(
        &mut self,
        req: &[u8],
        ends: &[usize],
        done: impl Fn(&[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        let timeout = self.timeout;
        let run = async {
            self.stream.write_requests(req, ends).await.ok()?;
            self.buf.clear();
            let mut chunk = [0u8; 16 * 1024];
            while !done(&self.buf) {
                let n = read_some(&self.stream, &mut chunk).await.ok()?;
                if n == 0 || self.buf.len() + n > MAX_PROBE_REPLY {
                    return None;
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
            Some(std::mem::take(&mut self.buf))
        };
        tokio::time::timeout(timeout, run).await.ok()?
    }

    /// `stats`: the server's pid and boot time. The whole reply is kept in
    /// `figures` for memrelay's own `stats`.
    async fn identity(&mut self, figures: &ServerFigures) -> Option<Identity> {
        let req = b"stats\r\n";
        let reply = self.stats_reply(req).await?;
        let text = String::from_utf8_lossy(&reply);
        let stat = |name: &str| -> Option<i64> {
            text.lines().find_map(|l| {
                l.strip_prefix("STAT ")?
                    .strip_prefix(name)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse()
                    .ok()
            })
        };
        let pid = stat("pid")? as u64;
        let boot = stat("time")? - stat("uptime")?;
        drop(text);
        figures.store(Group::General, reply);
        Some(Identity { pid, boot })
    }

    /// One `stats` request's reply, through its `END`.
    async fn stats_reply(&mut self, req: &[u8]) -> Option<Vec<u8>> {
        self.exchange(req, &[req.len()], |b| {
            b.ends_with(b"END\r\n") || b.ends_with(b"ERROR\r\n")
        })
        .await
    }

    /// `stats items` and `stats slabs`, kept in `figures`.
    async fn slab_figures(&mut self, figures: &ServerFigures) -> Option<()> {
        for (req, group) in [
            (&b"stats items\r\n"[..], Group::Items),
            (&b"stats slabs\r\n"[..], Group::Slabs),
        ] {
            let reply = self.stats_reply(req).await?;
            figures.store(group, reply);
        }
        Some(())
    }

    /// Deletes keys, pipelined; true when every delete was answered. A key
    /// that cannot be written in a classic command (a binary key from a
    /// meta `b` request) is deleted as `md <base64> b`.
    async fn delete_all(&mut self, keys: &[(Box<[u8]>, u64)]) -> bool {
        let mut req = Vec::with_capacity(keys.len() * 32);
        let mut ends = Vec::with_capacity(keys.len());
        for (k, _) in keys {
            if crate::ha::is_text_key(k) {
                req.extend_from_slice(b"delete ");
                req.extend_from_slice(k);
            } else {
                req.extend_from_slice(b"md ");
                memrelay_protocol::base64::encode(k, &mut req);
                req.extend_from_slice(b" b");
            }
            req.extend_from_slice(b"\r\n");
            ends.push(req.len());
        }
        let n = keys.len();
        match self
            .exchange(&req, &ends, |b| {
                b.iter().filter(|&&c| c == b'\n').count() >= n
            })
            .await
        {
            Some(reply) => reply
                .split(|&c| c == b'\n')
                .filter(|l| !l.is_empty())
                .all(|l| matches!(l, b"DELETED\r" | b"NOT_FOUND\r" | b"HD\r" | b"NF\r")),
            None => false,
        }
    }

    async fn flush_all(&mut self) -> bool {
        let req = b"flush_all\r\n";
        let reply = self
            .exchange(req, &[req.len()], |b| b.ends_with(b"\r\n"))
            .await;
        matches!(reply, Some(r) if r == b"OK\r\n")
    }
}

/// Flushes a server now, on a connection of its own: true when it said OK.
/// (A reload empties a server this way before giving it keys it may hold
/// stale copies of.)
pub async fn flush(dial: Dial, t: ProbeTimeouts) -> bool {
    match ProbeConn::open(&dial, t).await {
        Ok(mut c) => c.flush_all().await,
        Err(_) => false,
    }
}

/// Watches one server until the task is aborted (a reload removed the
/// server or changed its address). `on_restart`: where to ask for a resync
/// when it is seen to restart (the resync manager decides whether to).
pub async fn probe_loop(
    health: Arc<Health>,
    dial: tokio::sync::watch::Receiver<Dial>,
    timeouts: tokio::sync::watch::Receiver<ProbeTimeouts>,
    on_restart: crate::ha::resync::Requests,
) {
    // Seeded from the clock (fastrand's default): proxies started at the
    // same moment still draw different jitter.
    let mut rng = fastrand::Rng::new();
    let mut backoff = MIN_BACKOFF;
    let mut successes = 0;
    let mut known: Option<Identity> = None;
    let mut conn: Option<ProbeConn> = None;
    let mut last_identity = tokio::time::Instant::now() - IDENTITY_INTERVAL;
    // The last TLS failure logged: a server whose certificate is not
    // trusted fails every probe the same way, and is worth one warning,
    // not one every backoff.
    let mut tls_failure: Option<String> = None;
    let mut checks: u32 = 0;
    // When this prober last flushed the server (after its missed-key list
    // overflowed): flushes are at least FLUSH_EVERY apart.
    let mut last_flush: Option<tokio::time::Instant> = None;
    loop {
        let down = health.is_down();
        if !down {
            backoff = MIN_BACKOFF;
            successes = 0;
            let due = last_identity.elapsed() >= IDENTITY_INTERVAL;
            if !due && health.missed.is_empty() {
                tokio::select! {
                    _ = tokio::time::sleep(WATCH_INTERVAL) => {}
                    _ = health.missed.recorded_signal.notified() => {}
                }
                continue;
            }
        } else {
            // Jitter: between half and all of the backoff, so many proxies
            // probing the same server do not stampede it in step.
            let half = backoff.as_millis() as u64 / 2;
            let wait = backoff / 2 + Duration::from_millis(rng.u64(0..=half));
            tokio::time::sleep(wait).await;
        }

        let t = *timeouts.borrow();
        if conn.is_none() {
            let to = dial.borrow().clone();
            conn = match ProbeConn::open(&to, t).await {
                Ok(c) => {
                    tls_failure = None;
                    Some(c)
                }
                Err(e) => {
                    let why = e.to_string();
                    if e.kind() == std::io::ErrorKind::InvalidData
                        && tls_failure.as_ref() != Some(&why)
                    {
                        tracing::warn!(server = %health.name, error = %why, "TLS handshake failed");
                        tls_failure = Some(why);
                    }
                    None
                }
            };
        }
        let ok = match conn.as_mut() {
            Some(c) => {
                c.timeout = t.request;
                let ok = check(c, &health, &mut known, &on_restart, &mut last_flush).await;
                checks = checks.wrapping_add(1);
                let slabs_due = checks % SLAB_FIGURES_EVERY == 1;
                ok && (!slabs_due || c.slab_figures(&health.figures).await.is_some())
            }
            None => false,
        };
        if !ok {
            health.figures.clear();
        }
        last_identity = tokio::time::Instant::now();
        if !ok {
            conn = None;
            successes = 0;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            if !down {
                tokio::time::sleep(WATCH_INTERVAL).await;
            }
            continue;
        }
        if down {
            successes += 1;
            if successes >= SUCCESSES_TO_MARK_UP && health.missed.is_empty() {
                health.mark_up();
            }
            backoff = MIN_BACKOFF;
        }
    }
}

/// One look at a reachable server: identity, then invalidation of whatever
/// it missed. False when the server did not answer properly.
async fn check(
    c: &mut ProbeConn,
    health: &Health,
    known: &mut Option<Identity>,
    on_restart: &crate::ha::resync::Requests,
    last_flush: &mut Option<tokio::time::Instant>,
) -> bool {
    let Some(id) = c.identity(&health.figures).await else {
        return false;
    };
    let restarted = known.map(|k| !k.same_process(&id)).unwrap_or(false);
    if restarted {
        tracing::warn!(server = %health.name, pid = id.pid, "server restarted (its data is gone)");
        // Its missed keys are kept: this may be seen seconds after the
        // restart, and writes it missed since then (or took, and missed
        // a delete of) are on the list too. Deleting them on an empty
        // server costs a little work and is always right.
        // Warm it back up from the other tier (if resync is automatic).
        let _ = on_restart.send(crate::ha::resync::Request {
            server: health.name.clone(),
            automatic: true,
        });
    }
    *known = Some(id);
    health.set_identity(id.pid, id.boot);
    if health.missed.is_overflowed() {
        // The last resort, and it empties the server: not while another
        // server is down (this one may hold the only live copy of keys it
        // is not stale for; meanwhile it serves none), and at most once
        // per FLUSH_EVERY. Until then it stays stale for every key.
        let gate_open = health.flush_gate.get().is_none_or(|open| (open.0)());
        let rested = last_flush.is_none_or(|t| t.elapsed() >= FLUSH_EVERY);
        if !gate_open || !rested {
            tracing::debug!(server = %health.name, gate_open, rested, "flush after an overflow postponed");
            return true;
        }
        *last_flush = Some(tokio::time::Instant::now());
        if !c.flush_all().await {
            return false;
        }
        health
            .missed
            .flushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(server = %health.name, "flushed: it could hold stale copies of more keys than are remembered");
        health.missed.clear();
    }
    loop {
        let batch = health.missed.peek_batch(DELETE_BATCH);
        if batch.is_empty() {
            return true;
        }
        if !c.delete_all(&batch).await {
            return false;
        }
        health.missed.confirm(&batch);
    }
}
