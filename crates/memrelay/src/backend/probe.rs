//! The per-server watcher, on the main thread.
//!
//! - While a server is marked down nobody sends it requests, so this loop
//!   notices when it is back: it connects and asks `stats`, with jittered
//!   exponential backoff, and needs `SUCCESSES_TO_MARK_UP` good probes in a
//!   row (one lucky connect to a flapping server is not enough).
//! - It remembers each server's identity (pid and boot time from `stats`)
//!   and reports it, and a restart, to its [`Watcher`].
//! - What the server must be told before it serves again, and while it is
//!   up (invalidations, a flush), is the watcher's: the HA layer runs that
//!   upkeep over this probe's connection (`ha::upkeep`), and says when the
//!   server may be marked up. This layer knows no replica state.

use std::sync::Arc;
use std::time::Duration;

use super::connect::{Dial, ServerStream};
use super::health::Health;
use crate::net::read_some;
use crate::stats::servers::{Group, ServerFigures};
use memrelay_protocol::{compose, response};

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
/// Reply bytes accepted from one probe read before giving up on the server.
const MAX_PROBE_REPLY: usize = 1 << 20;

/// The timeouts probes use: the proxy's `--connect-timeout` and
/// `--timeout`, which a reload may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProbeTimeouts {
    pub connect: Duration,
    pub request: Duration,
}

/// Who a server is: a restart changes its pid or its boot time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Identity {
    pub pid: u64,
    pub boot: i64,
}

/// What a prober tells the layer above of its server, and the upkeep it
/// runs for it on every look at a reachable server.
pub(crate) trait Watcher {
    /// Work waits on the server (keys to invalidate): it is looked at
    /// without waiting for the next check, and not marked up until done.
    fn pending(&self) -> bool;
    /// Resolves when work may have appeared, to wake an up server's prober
    /// early.
    fn wake(&self) -> impl std::future::Future<Output = ()>;
    /// The server answered `stats`, asked at `asked`: who it is now;
    /// `restarted` when that is another process than the one seen last
    /// (its data is gone).
    fn seen(&mut self, who: Identity, restarted: bool, asked: std::time::Instant);
    /// Upkeep on the reachable server, over the probe's connection. False
    /// when the server did not answer properly.
    fn tend(&mut self, conn: &mut ProbeConn) -> impl std::future::Future<Output = bool>;
}

impl Identity {
    fn same_process(&self, other: &Identity) -> bool {
        // Boot time is derived from uptime, which ticks in whole seconds.
        self.pid == other.pid && (self.boot - other.boot).abs() <= 2
    }
}

/// One probe connection to a server.
#[derive(Debug)]
pub(crate) struct ProbeConn {
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
        let reply = self.stats_reply(None).await?;
        let stat = |name: &[u8]| response::stat_number(&reply, name);
        let pid = stat(b"pid")? as u64;
        let boot = stat(b"time")? - stat(b"uptime")?;
        figures.store(Group::General, reply);
        Some(Identity { pid, boot })
    }

    /// One `stats` request's reply, through its `END`.
    async fn stats_reply(&mut self, group: Option<&[u8]>) -> Option<Vec<u8>> {
        let mut req = Vec::with_capacity(16);
        compose::stats(&mut req, group);
        self.exchange(&req, &[req.len()], response::stats_complete)
            .await
    }

    /// `stats items` and `stats slabs`, kept in `figures`.
    async fn slab_figures(&mut self, figures: &ServerFigures) -> Option<()> {
        for (name, group) in [(&b"items"[..], Group::Items), (b"slabs", Group::Slabs)] {
            let reply = self.stats_reply(Some(name)).await?;
            figures.store(group, reply);
        }
        Some(())
    }

    /// How long the server has to answer one exchange (`--timeout`).
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Deletes keys, pipelined; true when every delete was answered. A key
    /// that cannot be written in a classic command (a binary key from a
    /// meta `b` request) is deleted as `md <base64> b`.
    pub(crate) async fn delete_all(&mut self, keys: &[(Box<[u8]>, u64)]) -> bool {
        let mut req = Vec::with_capacity(keys.len() * 32);
        let mut ends = Vec::with_capacity(keys.len());
        for (k, _) in keys {
            compose::delete_any(&mut req, k);
            ends.push(req.len());
        }
        let n = keys.len();
        match self
            .exchange(&req, &ends, |b| {
                b.iter().filter(|&&c| c == b'\n').count() >= n
            })
            .await
        {
            Some(reply) => response::deletes_confirmed(&reply),
            None => false,
        }
    }

    pub(crate) async fn flush_all(&mut self) -> bool {
        let mut req = Vec::with_capacity(16);
        compose::flush_all(&mut req, None);
        // Its reply is one line.
        let reply = self
            .exchange(&req, &[req.len()], |b| b.ends_with(b"\r\n"))
            .await;
        matches!(reply, Some(r) if response::is_ok(&r))
    }
}

/// Flushes a server now, on a connection of its own: true when it said OK.
/// (A reload empties a server this way before giving it keys it may hold
/// stale copies of.)
pub(crate) async fn flush(dial: Dial, t: ProbeTimeouts) -> bool {
    match ProbeConn::open(&dial, t).await {
        Ok(mut c) => c.flush_all().await,
        Err(_) => false,
    }
}

/// Watches one server until the task is aborted (a reload removed the
/// server or changed its address), reporting to `watcher`.
pub(crate) async fn probe_loop(
    health: Arc<Health>,
    dial: tokio::sync::watch::Receiver<Dial>,
    timeouts: tokio::sync::watch::Receiver<ProbeTimeouts>,
    mut watcher: impl Watcher,
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
    loop {
        let down = health.is_down();
        if !down {
            backoff = MIN_BACKOFF;
            successes = 0;
            let due = last_identity.elapsed() >= IDENTITY_INTERVAL;
            if !due && !watcher.pending() {
                tokio::select! {
                    _ = tokio::time::sleep(WATCH_INTERVAL) => {}
                    _ = watcher.wake() => {}
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
            conn = open_logged(&to, t, &health.name, &mut tls_failure).await;
        }
        let ok = match conn.as_mut() {
            Some(c) => {
                c.timeout = t.request;
                let ok = check(c, &health, &mut known, &mut watcher).await;
                checks = checks.wrapping_add(1);
                let slabs_due = checks % SLAB_FIGURES_EVERY == 1;
                ok && (!slabs_due || c.slab_figures(&health.figures).await.is_some())
            }
            None => false,
        };
        if !ok {
            health.figures.clear();
            // Whatever it held of requests given up on may still be
            // applied once it answers again: the watcher lets it settle.
            health.note_failure();
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
            if successes >= SUCCESSES_TO_MARK_UP && !watcher.pending() {
                health.mark_up();
            }
            backoff = MIN_BACKOFF;
        }
    }
}

/// A probe connection to `to`, or None. A TLS failure is logged once until
/// it changes or a connection succeeds (`tls_failure`: the last one logged).
async fn open_logged(
    to: &Dial,
    t: ProbeTimeouts,
    name: &str,
    tls_failure: &mut Option<String>,
) -> Option<ProbeConn> {
    match ProbeConn::open(to, t).await {
        Ok(c) => {
            *tls_failure = None;
            Some(c)
        }
        Err(e) => {
            let why = e.to_string();
            if e.kind() == std::io::ErrorKind::InvalidData && tls_failure.as_ref() != Some(&why) {
                tracing::warn!(server = %name, error = %why, "TLS handshake failed");
                *tls_failure = Some(why);
            }
            None
        }
    }
}

/// One look at a reachable server: identity, then the watcher's upkeep.
/// False when the server did not answer properly.
async fn check(
    c: &mut ProbeConn,
    health: &Health,
    known: &mut Option<Identity>,
    watcher: &mut impl Watcher,
) -> bool {
    let asked = std::time::Instant::now();
    let Some(id) = c.identity(&health.figures).await else {
        return false;
    };
    let restarted = known.map(|k| !k.same_process(&id)).unwrap_or(false);
    if restarted {
        tracing::warn!(server = %health.name, pid = id.pid, "server restarted (its data is gone)");
    }
    *known = Some(id);
    watcher.seen(id, restarted, asked);
    watcher.tend(c).await
}
