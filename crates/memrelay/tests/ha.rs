//! High-availability scenarios: memrelay in front of real memcached
//! primaries (`-s`) and backups (`-b`) that are killed, restarted on the same
//! port (empty), SIGSTOPped and SIGCONTed while clients use the proxy.
//!
//! The contract under test, in short: writes go to the key's primary and are
//! mirrored to its backup according to the primary's answer; when the
//! primary cannot take a write it goes to the backup exactly once; reads fall
//! back to the backup (and repair the primary with `add`); a server that
//! missed writes never serves the old value again; with both replicas of a
//! key down, reads miss and writes fail with `SERVER_ERROR`.
//!
//! Every scenario starts its own memcached processes and memrelay. Waiting is
//! always on a condition with a deadline (poll `stats`, poll a value); sleeps
//! only pace the chaos threads, they never decide an outcome.
//!
//! Oracles: where a reply is checked, a lone "reference" memcached given the
//! same state and the same command says what the reply must be.
#![allow(clippy::panic, clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use memrelay::config::cli::{parse_args, Action};
use memrelay::router::Router;
use support::conn::Conn;
use support::model::{self, Ctx, KeyModel, Op, Tally};
use support::{
    complete_retrieval, escape, meta_done, parse_mg, parse_values, same_item, stats, wait_until,
    Client, Cluster, End, Fault, Forwarder, Item, Memcached, Memrelay, Reply, Rng, Val,
};

/// The proxy's per-request server timeout in these tests.
const TIMEOUT: &str = "300ms";
/// Longest acceptable answer from the proxy while servers fail or hang:
/// a couple of server timeouts plus generous slack for a debug build on a
/// small machine.
const ANSWER_BOUND: Duration = Duration::from_secs(2);
/// Deadline for background work to become visible (mirrors, repairs,
/// invalidation, marking servers up or down).
const CONVERGE: Duration = Duration::from_secs(5);
/// Deadline the test client gives one exchange (much larger than
/// ANSWER_BOUND, so a slow answer is measured, not cut off).
const CLIENT_DEADLINE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Cluster: primaries, backups, one memrelay, and where keys live
// ---------------------------------------------------------------------------

/// `np` primaries, `nb` backups and memrelay in front (the kit's
/// `HA_FLAGS`: 300 ms server timeouts, two workers), with `extra` flags.
fn cluster(np: usize, nb: usize, extra: &[&str]) -> Cluster {
    Cluster::builder()
        .primaries(np)
        .backups(nb)
        .flags(extra)
        .start()
}

/// What these tests add to the kit's cluster: where memrelay puts a key
/// (its own router, built from the same server list), and a client of
/// the proxy that frames replies by their shape.
trait HaCluster {
    fn router(&self) -> Router;
    /// Index (into `primaries`) of the key's primary.
    fn primary_of(&self, key: &str) -> usize;
    /// Index (into `backups`) of the key's backup.
    fn backup_of(&self, key: &str) -> usize;
    /// `n` keys `prefix0, prefix1...` (skipping some) whose primary is `p`.
    fn keys_on(&self, p: usize, prefix: &str, n: usize) -> Vec<String>;
    fn px(&self) -> Px;
}

impl HaCluster for Cluster {
    fn router(&self) -> Router {
        match parse_args(self.server_args()) {
            Ok(Action::Run(cfg)) => Router::new(&cfg),
            other => panic!("bad server args: {other:?}"),
        }
    }

    fn primary_of(&self, key: &str) -> usize {
        self.router().primary(key.as_bytes())
    }

    fn backup_of(&self, key: &str) -> usize {
        let r = self.router().replicas(key.as_bytes());
        r.get(1).expect("key has a backup") - self.primaries.len()
    }

    fn keys_on(&self, p: usize, prefix: &str, n: usize) -> Vec<String> {
        let router = self.router();
        let mut out = Vec::new();
        let mut i = 0;
        while out.len() < n {
            let k = format!("{prefix}{i}");
            if router.primary(k.as_bytes()) == p {
                out.push(k);
            }
            i += 1;
            assert!(i < 100_000, "no keys map to primary {p}");
        }
        out
    }

    fn px(&self) -> Px {
        Px::connect(&self.relay.addr())
    }
}

// ---------------------------------------------------------------------------
// Items, direct access to memcached
// ---------------------------------------------------------------------------

fn direct_client(m: &Memcached) -> Client {
    let mut c = m.client();
    c.set_deadline(Duration::from_secs(3));
    c
}

fn line_done(b: &[u8]) -> bool {
    b.ends_with(b"\r\n")
}

/// The item for `key` on `m` (via `mg`, which also reports the TTL).
fn peek(m: &Memcached, key: &str) -> Option<Item> {
    let mut c = direct_client(m);
    let r = c.send_until(format!("mg {key} v f t\r\n").as_bytes(), meta_done);
    assert_eq!(
        r.end,
        End::Complete,
        "mg {key} on {}: {}",
        m.addr(),
        escape(&r.bytes)
    );
    parse_mg(&r.bytes).unwrap_or_else(|e| panic!("mg {key} on {}: {e}", m.addr()))
}

/// Stores an item straight on `m`.
fn poke(m: &Memcached, key: &str, flags: u32, exptime: i64, value: &str) {
    let mut c = direct_client(m);
    let r = c.send_until(
        format!("set {key} {flags} {exptime} {}\r\n{value}\r\n", value.len()).as_bytes(),
        line_done,
    );
    assert_eq!(r.bytes, b"STORED\r\n", "direct set {key} on {}", m.addr());
}

/// The cas unique of `key` on `m` (memcached's own `gets`).
fn direct_cas(m: &Memcached, key: &str) -> Option<u64> {
    let mut c = direct_client(m);
    let r = c.send_until(format!("gets {key}\r\n").as_bytes(), complete_retrieval);
    parse_values(&r.bytes)
        .unwrap_or_else(|e| panic!("gets on {}: {e}", m.addr()))
        .first()
        .and_then(|v| v.cas)
}

// ---------------------------------------------------------------------------
// A client of the proxy
// ---------------------------------------------------------------------------

/// A connection to memrelay. The sentinel-based `exchange` is not used:
/// the sentinel key is routed like any other, and these tests take its
/// servers down. Replies are framed by their own shape instead.
struct Px {
    c: Client,
}

impl Px {
    fn connect(addr: &str) -> Px {
        let mut c = Client::connect(addr);
        c.set_deadline(CLIENT_DEADLINE);
        Px { c }
    }

    /// Sends `req`, reads one reply line; returns it and how long it took.
    fn line_timed(&mut self, req: &str) -> (Reply, Duration) {
        let t = Instant::now();
        let r = self.c.send_until(req.as_bytes(), line_done);
        (r, t.elapsed())
    }

    /// Sends `req`, reads one reply line, which must arrive.
    fn line(&mut self, req: &str) -> String {
        let (r, _) = self.line_timed(req);
        assert_eq!(
            r.end,
            End::Complete,
            "no complete reply from memrelay to {req:?}: {}",
            escape(&r.bytes)
        );
        String::from_utf8_lossy(&r.bytes).into_owned()
    }

    /// Sends a request whose reply is a retrieval reply.
    fn retrieval_timed(&mut self, req: &str) -> (Reply, Duration) {
        let t = Instant::now();
        let r = self.c.send_until(req.as_bytes(), complete_retrieval);
        (r, t.elapsed())
    }

    fn values(&mut self, req: &str) -> Vec<Val> {
        let (r, _) = self.retrieval_timed(req);
        assert_eq!(
            r.end,
            End::Complete,
            "no complete reply from memrelay to {req:?}: {}",
            escape(&r.bytes)
        );
        parse_values(&r.bytes).unwrap_or_else(|e| panic!("reply to {req:?}: {e}"))
    }

    fn get(&mut self, key: &str) -> Option<Val> {
        let v = self.values(&format!("get {key}\r\n"));
        assert!(v.len() <= 1, "get {key}: {v:?}");
        v.into_iter().next()
    }

    fn gets_cas(&mut self, key: &str) -> Option<u64> {
        let v = self.values(&format!("gets {key}\r\n"));
        v.first().map(|v| v.cas.expect("gets reply has a cas"))
    }

    fn set(&mut self, key: &str, flags: u32, value: &str) -> String {
        self.line(&format!(
            "set {key} {flags} 0 {}\r\n{value}\r\n",
            value.len()
        ))
    }

    fn write_raw(&mut self, req: &str) {
        self.c.write_raw(req.as_bytes());
    }
}

fn stat_u64(s: &HashMap<String, String>, name: &str) -> u64 {
    s.get(name)
        .unwrap_or_else(|| panic!("stats has no {name}: {s:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("stats {name} is not a number: {s:?}"))
}

// ---------------------------------------------------------------------------
// Write commands (for the oracle-checked scenarios)
// ---------------------------------------------------------------------------

/// Which cas unique a `cas` sends.
#[derive(Debug, Clone, Copy)]
enum CasId {
    /// The item's current one (from `gets` on the same path).
    Current,
    /// The current one plus 1000: someone else changed it.
    Wrong,
    /// An arbitrary number, for a key that does not exist.
    Arbitrary,
}

#[derive(Debug, Clone, Copy)]
enum W {
    Set(&'static str),
    Add(&'static str),
    Replace(&'static str),
    Append(&'static str),
    Prepend(&'static str),
    Cas(&'static str, CasId),
    Delete,
    Incr(u64),
    Decr(u64),
    Touch(i64),
}

/// Flags and TTL the storage commands use (distinct from the pre-states',
/// so that a mirror that loses them is visible).
const W_FLAGS: u32 = 42;
const W_TTL: i64 = 1000;

impl W {
    fn name(&self) -> &'static str {
        match self {
            W::Set(_) => "set",
            W::Add(_) => "add",
            W::Replace(_) => "replace",
            W::Append(_) => "append",
            W::Prepend(_) => "prepend",
            W::Cas(..) => "cas",
            W::Delete => "delete",
            W::Incr(_) => "incr",
            W::Decr(_) => "decr",
            W::Touch(_) => "touch",
        }
    }

    /// The request line(s); `cas` is the unique a `cas` sends.
    fn render(&self, key: &str, cas: u64, noreply: bool) -> String {
        let nr = if noreply { " noreply" } else { "" };
        let storage = |cmd: &str, v: &str| {
            format!("{cmd} {key} {W_FLAGS} {W_TTL} {}{nr}\r\n{v}\r\n", v.len())
        };
        match *self {
            W::Set(v) | W::Add(v) | W::Replace(v) | W::Append(v) | W::Prepend(v) => {
                storage(self.name(), v)
            }
            W::Cas(v, _) => format!(
                "cas {key} {W_FLAGS} {W_TTL} {} {cas}{nr}\r\n{v}\r\n",
                v.len()
            ),
            W::Delete => format!("delete {key}{nr}\r\n"),
            W::Incr(n) => format!("incr {key} {n}{nr}\r\n"),
            W::Decr(n) => format!("decr {key} {n}{nr}\r\n"),
            W::Touch(t) => format!("touch {key} {t}{nr}\r\n"),
        }
    }
}

/// Resolves the cas unique a command sends, given the item's current one.
fn cas_for(w: W, current: Option<u64>) -> u64 {
    match w {
        W::Cas(_, CasId::Current) => current.expect("cas Current needs an item"),
        W::Cas(_, CasId::Wrong) => current.expect("cas Wrong needs an item") + 1000,
        _ => 987_654,
    }
}

/// Applies `w` to the reference memcached and returns its reply ("" for
/// noreply, after making sure it was executed).
fn apply_reference(r: &Memcached, key: &str, w: W, noreply: bool) -> String {
    let cas = cas_for(w, direct_cas(r, key));
    let mut c = direct_client(r);
    if noreply {
        // `mn` answers `MN` once everything before it was executed.
        let req = format!("{}mn\r\n", w.render(key, cas, true));
        let rep = c.send_until(req.as_bytes(), line_done);
        assert_eq!(rep.bytes, b"MN\r\n", "reference: {}", escape(&rep.bytes));
        String::new()
    } else {
        let rep = c.send_until(w.render(key, cas, false).as_bytes(), line_done);
        String::from_utf8_lossy(&rep.bytes).into_owned()
    }
}

/// The pre-states the command scenarios start from.
const PRE_FLAGS: u32 = 7;

/// Every write command with the pre-states that make each of its answers.
fn write_cases() -> Vec<(W, Option<&'static str>)> {
    vec![
        (W::Set("x"), None),
        (W::Set("x"), Some("a")),
        (W::Add("x"), None),
        (W::Add("x"), Some("a")),
        (W::Replace("x"), None),
        (W::Replace("x"), Some("a")),
        (W::Append("b"), None),
        (W::Append("b"), Some("a")),
        (W::Prepend("b"), None),
        (W::Prepend("b"), Some("a")),
        (W::Cas("x", CasId::Current), Some("a")),
        (W::Cas("x", CasId::Wrong), Some("a")),
        (W::Cas("x", CasId::Arbitrary), None),
        (W::Delete, None),
        (W::Delete, Some("a")),
        (W::Incr(3), None),
        (W::Incr(3), Some("5")),
        (W::Decr(2), None),
        (W::Decr(2), Some("5")),
        (W::Decr(9), Some("5")),
        (W::Touch(W_TTL), None),
        (W::Touch(W_TTL), Some("a")),
    ]
}

fn case_name(w: W, pre: Option<&str>, noreply: bool) -> String {
    format!(
        "{:?} on {} {}",
        w,
        pre.map(|p| format!("item {p:?}"))
            .unwrap_or("no item".into()),
        if noreply { "(noreply)" } else { "" }
    )
}

// ---------------------------------------------------------------------------
// 1. The seeds' scenario
// ---------------------------------------------------------------------------

#[test]
fn seed_scenario_values_survive_primaries_dying_and_are_repaired() {
    let mut cl = cluster(2, 1, &[]);
    let keys = [("key1", 3u32, "value-one"), ("key2", 9u32, "value-two")];
    let mut px = cl.px();
    for (k, f, v) in keys {
        assert_eq!(px.set(k, f, v), "STORED\r\n", "set {k}");
    }
    // And one with a TTL, which a repair must carry over (what remains of it).
    assert_eq!(
        px.line("set key3 11 1000 5\r\nthree\r\n"),
        "STORED\r\n",
        "set key3"
    );
    // Each key on exactly its primary, and (mirrored in the background) on
    // the backup.
    for (k, f, v) in keys {
        let p = cl.primary_of(k);
        let want = Some(Item {
            value: v.to_string(),
            flags: f,
            ttl: -1,
        });
        assert_eq!(peek(&cl.primaries[p], k), want, "{k} on its primary {p}");
        assert_eq!(
            peek(&cl.primaries[1 - p], k),
            None,
            "{k} on the other primary"
        );
        let b = &cl.backups[0];
        assert!(
            wait_until(CONVERGE, || peek(b, k) == want),
            "{k} never reached the backup: {:?}",
            peek(b, k)
        );
    }

    // Both primaries die: every value is still served, promptly.
    cl.primaries[0].kill();
    cl.primaries[1].kill();
    for round in 0..5 {
        for (k, f, v) in keys {
            let t = Instant::now();
            let got = px.get(k);
            assert!(t.elapsed() < ANSWER_BOUND, "get {k} took {:?}", t.elapsed());
            assert_eq!(
                got.map(|g| (g.flags, g.data)),
                Some((f, v.to_string())),
                "get {k} (round {round}) with both primaries dead"
            );
        }
    }
    let got = px.values("get key1 key2\r\n");
    assert_eq!(got.len(), 2, "multi-get with both primaries dead: {got:?}");

    // They come back empty on the same ports: still served, and repaired
    // onto their primaries with the same flags.
    cl.primaries[0].restart();
    cl.primaries[1].restart();
    for (k, f, v) in keys {
        let p = cl.primary_of(k);
        let want = Some(Item {
            value: v.to_string(),
            flags: f,
            ttl: -1,
        });
        let mut served = Vec::new();
        let repaired = wait_until(CONVERGE, || {
            served.push(px.get(k).map(|g| (g.flags, g.data)));
            peek(&cl.primaries[p], k) == want
        });
        let wrong: Vec<_> = served
            .iter()
            .filter(|s| **s != Some((f, v.to_string())))
            .collect();
        assert!(wrong.is_empty(), "get {k} after restart served {wrong:?}");
        if !repaired {
            let d = cl.diag();
            panic!(
                "{k} never repaired onto primary {p}: it holds {:?}\n{d}",
                peek(&cl.primaries[p], k)
            );
        }
    }
    let p3 = cl.primary_of("key3");
    let ok = wait_until(CONVERGE, || {
        let _ = px.get("key3");
        peek(&cl.primaries[p3], "key3").is_some()
    });
    let got = peek(&cl.primaries[p3], "key3");
    assert!(
        ok && matches!(&got, Some(i) if i.value == "three" && i.flags == 11 && (980..=1000).contains(&i.ttl)),
        "key3 (flags 11, TTL 1000) repaired onto primary {p3} as {got:?}"
    );
    let s = stats(&cl.relay.addr());
    assert!(stat_u64(&s, "backup_hits") > 0, "backup_hits: {s:?}");
    assert!(stat_u64(&s, "repairs") > 0, "repairs: {s:?}");
}

// ---------------------------------------------------------------------------
// 2. Every write command with its primary killed
// ---------------------------------------------------------------------------

/// With the primary dead, each write must reach the backup exactly once and
/// answer what a lone memcached holding the backup's state answers.
fn writes_with_primary_killed(wait_marked_down: bool) {
    let extra: &[&str] = if wait_marked_down {
        &[]
    } else {
        // Never marked down: every command meets the dead primary itself.
        &["--failure-limit", "1000"]
    };
    let mut cl = cluster(1, 1, extra);
    let reference = Memcached::start();
    cl.primaries[0].kill();
    if wait_marked_down {
        cl.wait_state(0, "down", |cl| {
            let _ = cl.px().get("nudge");
        });
    }
    let mut px = cl.px();
    let mut checked: Vec<(String, String)> = Vec::new();
    let mut failures = Vec::new();
    for noreply in [false, true] {
        for (i, (w, pre)) in write_cases().into_iter().enumerate() {
            let name = case_name(w, pre, noreply);
            let key = format!("w{}-{i}-{}", u8::from(noreply), w.name());
            let b = &cl.backups[0];
            if let Some(v) = pre {
                poke(b, &key, PRE_FLAGS, 0, v);
                poke(&reference, &key, PRE_FLAGS, 0, v);
            }
            let cas = cas_for(
                w,
                if pre.is_some() {
                    px.gets_cas(&key)
                } else {
                    None
                },
            );
            let req = w.render(&key, cas, noreply);
            let want_reply = apply_reference(&reference, &key, w, noreply);
            let got_reply = if noreply {
                px.write_raw(&req);
                String::new()
            } else {
                let (r, took) = px.line_timed(&req);
                if took > ANSWER_BOUND {
                    failures.push(format!("{name}: answered in {took:?}"));
                }
                String::from_utf8_lossy(&r.bytes).into_owned()
            };
            if got_reply != want_reply {
                failures.push(format!(
                    "{name}: memrelay answered {got_reply:?}, a lone memcached {want_reply:?}"
                ));
            }
            let want = peek(&reference, &key);
            let converged = wait_until(CONVERGE, || same_item(&peek(b, &key), &want));
            if !converged {
                failures.push(format!(
                    "{name}: backup holds {:?}, expected {want:?}",
                    peek(b, &key)
                ));
                continue;
            }
            // And the proxy serves exactly that.
            let served = px.get(&key).map(|v| (v.flags, v.data));
            let want_served = want.as_ref().map(|i| (i.flags, i.value.clone()));
            if served != want_served {
                failures.push(format!(
                    "{name}: get through memrelay gave {served:?}, expected {want_served:?}"
                ));
            }
            checked.push((key, name));
        }
    }
    // Nothing applied twice later on: the backup still equals the reference.
    for (key, name) in &checked {
        let (got, want) = (peek(&cl.backups[0], key), peek(&reference, key));
        if !same_item(&got, &want) {
            failures.push(format!(
                "{name}: at the end the backup holds {got:?}, expected {want:?}"
            ));
        }
    }
    if !failures.is_empty() {
        let d = cl.diag();
        panic!(
            "{} of {} write cases wrong with the primary killed{}:\n  {}\n{d}",
            failures.len(),
            write_cases().len() * 2,
            if wait_marked_down {
                " (marked down)"
            } else {
                " (not yet marked down)"
            },
            failures.join("\n  ")
        );
    }
    let s = stats(&cl.relay.addr());
    assert!(stat_u64(&s, "failovers") > 0, "failovers: {s:?}");
}

#[test]
fn every_write_goes_to_the_backup_once_when_the_primary_is_marked_down() {
    writes_with_primary_killed(true);
}

#[test]
fn every_write_goes_to_the_backup_once_when_the_primary_just_died() {
    writes_with_primary_killed(false);
}

// ---------------------------------------------------------------------------
// 3. Mirroring while everything is up
// ---------------------------------------------------------------------------

/// What the backup must hold once the mirror is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BackupEnd {
    /// Exactly the primary's item (or, with the primary empty, nothing).
    AsPrimary,
    /// No item.
    Nothing,
    /// The primary lost the item the backup holds: the write applies to the
    /// backup's item (as a read would find it), and the primary stays empty.
    TakesTheWrite,
}

#[test]
fn backup_mirrors_the_primary_after_every_write() {
    let mut cl = cluster(1, 1, &[]);
    let reference = Memcached::start();
    let mut px = cl.px();
    // (command, primary's pre-state, backup's pre-state, backup's end state)
    let mut cases: Vec<(W, Option<&str>, Option<&str>, BackupEnd)> = write_cases()
        .into_iter()
        .map(|(w, pre)| (w, pre, pre, BackupEnd::AsPrimary))
        .collect();
    // The backup holds something the primary does not (the primary lost
    // it): the write falls back to the backup's item, as a read would.
    for w in [
        W::Replace("x"),
        W::Append("b"),
        W::Prepend("b"),
        W::Cas("x", CasId::Arbitrary),
        W::Delete,
        W::Incr(1),
        W::Decr(1),
        W::Touch(W_TTL),
    ] {
        cases.push((w, None, Some("10"), BackupEnd::TakesTheWrite));
    }
    cases.push((W::Set("x"), None, Some("10"), BackupEnd::AsPrimary));
    // Create-if-absent: the backup's item is the key's (the primary lost
    // it), so `add` is refused as one memcached holding it would refuse it.
    cases.push((W::Add("x"), None, Some("10"), BackupEnd::TakesTheWrite));
    // The backup's number differs: after incr/decr its copy must go.
    cases.push((W::Incr(1), Some("5"), Some("10"), BackupEnd::Nothing));
    cases.push((W::Decr(1), Some("5"), Some("10"), BackupEnd::Nothing));

    let mut failures = Vec::new();
    let mut checked = Vec::new();
    for noreply in [false, true] {
        for (i, (w, pre_p, pre_b, end)) in cases.iter().copied().enumerate() {
            let name = format!(
                "{} [backup pre-state {:?}]",
                case_name(w, pre_p, noreply),
                pre_b
            );
            let key = format!("m{}-{i}-{}", u8::from(noreply), w.name());
            let (p, b) = (&cl.primaries[0], &cl.backups[0]);
            let takes = end == BackupEnd::TakesTheWrite;
            if let Some(v) = pre_p {
                poke(p, &key, PRE_FLAGS, 0, v);
            }
            if let Some(v) = if takes { pre_b } else { pre_p } {
                poke(&reference, &key, PRE_FLAGS, 0, v);
            }
            if let Some(v) = pre_b {
                poke(b, &key, PRE_FLAGS, 0, v);
            }
            let cas = cas_for(
                w,
                if pre_p.is_some() {
                    px.gets_cas(&key)
                } else {
                    None
                },
            );
            let want_reply = apply_reference(&reference, &key, w, noreply);
            let got_reply = if noreply {
                px.write_raw(&w.render(&key, cas, true));
                String::new()
            } else {
                px.line(&w.render(&key, cas, false))
            };
            if got_reply != want_reply {
                failures.push(format!(
                    "{name}: memrelay answered {got_reply:?}, a lone memcached {want_reply:?}"
                ));
            }
            let want_p = if takes { None } else { peek(&reference, &key) };
            if !wait_until(CONVERGE, || same_item(&peek(p, &key), &want_p)) {
                failures.push(format!(
                    "{name}: primary holds {:?}, expected {want_p:?}",
                    peek(p, &key)
                ));
                continue;
            }
            let want_b = match end {
                BackupEnd::AsPrimary => want_p.clone(),
                BackupEnd::Nothing => None,
                BackupEnd::TakesTheWrite => peek(&reference, &key),
            };
            if !wait_until(CONVERGE, || same_item(&peek(b, &key), &want_b)) {
                failures.push(format!(
                    "{name}: backup holds {:?}, primary {want_p:?}; expected backup {want_b:?}",
                    peek(b, &key)
                ));
                continue;
            }
            checked.push((key, name, want_b));
        }
    }
    // Late mirrors must not change anything afterwards.
    for (key, name, want_b) in &checked {
        let got = peek(&cl.backups[0], key);
        if !same_item(&got, want_b) {
            failures.push(format!(
                "{name}: at the end the backup holds {got:?}, expected {want_b:?}"
            ));
        }
    }
    if !failures.is_empty() {
        let d = cl.diag();
        panic!(
            "{} of {} mirroring cases wrong:\n  {}\n{d}",
            failures.len(),
            cases.len() * 2,
            failures.join("\n  ")
        );
    }
}

// ---------------------------------------------------------------------------
// 4. A hung primary
// ---------------------------------------------------------------------------

#[test]
fn hung_primary_is_bypassed_and_never_serves_stale_after_it_resumes() {
    let mut cl = cluster(2, 1, &[]);
    let key = "hung-key";
    let p = cl.primary_of(key);
    let mut px = cl.px();
    assert_eq!(px.set(key, 5, "v1"), "STORED\r\n");
    let b = &cl.backups[0];
    assert!(
        wait_until(CONVERGE, || peek(b, key).map(|i| i.value)
            == Some("v1".into())),
        "v1 never mirrored"
    );

    cl.primaries[p].stop();
    // A read answers from the backup within the bound.
    let t = Instant::now();
    let got = px.get(key);
    let took = t.elapsed();
    assert!(took < ANSWER_BOUND, "get with a hung primary took {took:?}");
    assert_eq!(
        got.map(|v| v.data),
        Some("v1".into()),
        "get with a hung primary"
    );
    // A multi-get over a key of the hung primary and one of the other.
    let other = cl.keys_on(1 - p, "other", 1).remove(0);
    assert_eq!(px.set(&other, 0, "o"), "STORED\r\n");
    let t = Instant::now();
    let got = px.values(&format!("get {key} {other}\r\n"));
    let took = t.elapsed();
    assert!(
        took < ANSWER_BOUND,
        "multi-get with a hung primary took {took:?}"
    );
    let got: Vec<(String, String)> = got.into_iter().map(|v| (v.key, v.data)).collect();
    assert_eq!(
        got,
        vec![
            (key.to_string(), "v1".to_string()),
            (other.clone(), "o".to_string())
        ],
        "multi-get with a hung primary"
    );
    // A write is applied by the backup within the bound.
    let (r, took) = px.line_timed("set hung-key 5 0 2\r\nv2\r\n");
    assert!(took < ANSWER_BOUND, "set with a hung primary took {took:?}");
    assert_eq!(
        r.bytes,
        b"STORED\r\n",
        "set with a hung primary: {}",
        escape(&r.bytes)
    );
    assert_eq!(
        peek(&cl.backups[0], key).map(|i| i.value),
        Some("v2".into()),
        "v2 not on the backup"
    );
    // And a second write, while the first one may still sit unread in the
    // hung primary's socket.
    let (r, took) = px.line_timed("set hung-key 5 0 2\r\nv3\r\n");
    assert!(
        took < ANSWER_BOUND,
        "second set with a hung primary took {took:?}"
    );
    assert_eq!(r.bytes, b"STORED\r\n", "second set: {}", escape(&r.bytes));
    let t = Instant::now();
    let got = px.get(key).map(|v| v.data);
    assert!(t.elapsed() < ANSWER_BOUND, "get took {:?}", t.elapsed());
    assert_eq!(got, Some("v3".into()), "get while the primary hangs");

    cl.primaries[p].cont();
    // From now on only v3 (or a miss) may be served, never v1 or v2.
    let end = Instant::now() + Duration::from_secs(2);
    let mut reads = 0;
    let mut bad = Vec::new();
    while Instant::now() < end {
        let t = Instant::now();
        let got = px.get(key).map(|v| v.data);
        let took = t.elapsed();
        reads += 1;
        if took > ANSWER_BOUND {
            bad.push(format!("read {reads} took {took:?}"));
        }
        if got.is_some() && got.as_deref() != Some("v3") {
            bad.push(format!("read {reads} served {got:?}"));
        }
    }
    // The resumed primary itself may hold v3 or nothing, never older.
    let on_p = peek(&cl.primaries[p], key).map(|i| i.value);
    if on_p.is_some() && on_p.as_deref() != Some("v3") {
        bad.push(format!("the resumed primary holds {on_p:?}"));
    }
    if !bad.is_empty() {
        let d = cl.diag();
        panic!(
            "after SIGCONT ({reads} reads), expected only v3:\n  {}\n{d}",
            bad.join("\n  ")
        );
    }
}

// ---------------------------------------------------------------------------
// 4b. What a stalled primary still held, applied late
// ---------------------------------------------------------------------------

/// `--timeout` in the late-delivery tests. A server settles for as long
/// after it answers again before a delete may clear its missed keys
/// (`ha::settle`): long here, so that "before" and "after" stand apart on
/// a busy host.
const SETTLE: Duration = Duration::from_secs(1);

/// Deletes `m` has executed (memcached's own counters).
fn deletes_on(m: &Memcached) -> u64 {
    let s = stats(&m.addr());
    stat_u64(&s, "delete_hits") + stat_u64(&s, "delete_misses")
}

/// Reads `key` through the proxy: fails the test, saying `why`, unless
/// it gives `want`.
fn must_read(px: &mut Px, key: &str, want: &str, why: &str) {
    let got = px.get(key).map(|v| v.data);
    assert!(
        got.as_deref() == Some(want),
        "{why}: get {key} gave {got:?}, want {want:?}"
    );
}

/// The primary is stopped while a write goes past it (it times out, the
/// backup takes it, the key is recorded as missed on the primary): what
/// the primary's socket still holds of that write is applied when it runs
/// again. The delete that clears the record waits until the primary has
/// answered for a settle period, and the key is served right throughout:
/// by the backup meanwhile, then by the primary.
#[test]
fn a_resumed_primary_settles_before_its_missed_keys_are_deleted() {
    let timeout = format!("{}ms", SETTLE.as_millis());
    let mut cl = cluster(1, 1, &["--timeout", &timeout]);
    let key = "settle-key";
    let mut px = cl.px();
    assert_eq!(px.set(key, 0, "v0"), "STORED\r\n");
    let b = &cl.backups[0];
    assert!(
        wait_until(CONVERGE, || peek(b, key).map(|i| i.value)
            == Some("v0".into())),
        "v0 never mirrored"
    );
    let deletes_before = deletes_on(&cl.primaries[0]);

    cl.primaries[0].stop();
    // Times out on the primary, whose kernel keeps the bytes.
    assert_eq!(px.set(key, 0, "v1"), "STORED\r\n");
    let s = stats(&cl.relay.addr());
    assert_eq!(stat_u64(&s, "server:0:missed_keys"), 1, "{s:?}");
    // The primary does not take this one: the key is listed for it.
    assert_eq!(px.set(key, 0, "v2"), "STORED\r\n");

    let resumed = Instant::now();
    cl.primaries[0].cont();
    // It applies v1 now. Until the delete, reads come from the backup.
    let deleted = wait_until(CONVERGE, || {
        must_read(&mut px, key, "v2", "while the primary settles");
        deletes_on(&cl.primaries[0]) > deletes_before
    });
    let after = resumed.elapsed();
    assert!(
        deleted,
        "the key was never deleted on the primary\n{}",
        cl.diag()
    );
    assert!(
        after >= SETTLE,
        "the delete reached the primary {after:?} after it was resumed, before \
         it had answered for {SETTLE:?}: v1, still in its socket, could land after it"
    );
    let cleared = wait_until(CONVERGE, || {
        stat_u64(&stats(&cl.relay.addr()), "server:0:missed_keys") == 0
    });
    assert!(cleared, "the record was never cleared\n{}", cl.diag());
    must_read(&mut px, key, "v2", "once the primary serves again");
    let on_p = peek(&cl.primaries[0], key).map(|i| i.value);
    assert!(
        on_p.is_none() || on_p.as_deref() == Some("v2"),
        "the resumed primary holds {on_p:?}"
    );
}

/// A value written while the backup missed the key (it was stopped: the
/// key is listed for it, and the write goes to the primary alone) is
/// copied back to the backup once the backup has settled and the key was
/// deleted there. Without the copy the value had one replica until the
/// key was written again, and the primary's death lost it.
#[test]
fn a_value_the_backup_missed_is_copied_back_to_it_once_it_serves_again() {
    let mut cl = cluster(1, 1, &["--timeout", TIMEOUT]);
    let key = "copied-back";
    let mut px = cl.px();
    assert_eq!(px.set(key, 0, "v0"), "STORED\r\n");
    assert!(
        wait_until(CONVERGE, || peek(&cl.backups[0], key).map(|i| i.value)
            == Some("v0".into())),
        "v0 never mirrored"
    );
    cl.backups[0].stop();
    // Times out on the backup: the key is listed for it.
    assert_eq!(px.set(key, 0, "v1"), "STORED\r\n");
    let s = stats(&cl.relay.addr());
    assert_eq!(stat_u64(&s, "server:1:missed_keys"), 1, "{s:?}");
    // Goes to the primary alone.
    assert_eq!(px.set(key, 0, "v2"), "STORED\r\n");
    cl.backups[0].cont();
    // Deleted once the backup settled, then copied back (after the
    // longest a client write can be in flight): well within 15 s.
    let copied = wait_until(Duration::from_secs(15), || {
        peek(&cl.backups[0], key).map(|i| i.value) == Some("v2".into())
    });
    assert!(copied, "v2 never reached the backup\n{}", cl.diag());
    cl.primaries[0].kill();
    must_read(&mut px, key, "v2", "with the primary dead");
}

/// CPU time (user + system) the process `pid` has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): utime and
    // stime are the 12th and 13th, in clock ticks (100 per second here).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// A flush that must wait does not make the prober look at the server
/// again and again without a pause: memrelay stays near idle meanwhile.
/// (The prober used to spin a core.) Both servers miss a `flush_all`, so
/// both lists cover every key; of two such servers of different tiers
/// the one whose name sorts first is flushed first, and that is the
/// backup here, which is dead: the primary's flush waits for good. A high
/// failure limit keeps the primary up, as when a peer's hint or a reload
/// is what asks for the flush.
#[test]
fn a_postponed_flush_does_not_spin_the_prober() {
    let (m1, m2) = (Memcached::start(), Memcached::start());
    let (mut primary, mut backup) = if m1.addr() > m2.addr() {
        (m1, m2)
    } else {
        (m2, m1)
    };
    let relay = Memrelay::start(&[
        "-s",
        &primary.addr(),
        "-b",
        &backup.addr(),
        "--timeout",
        TIMEOUT,
        "--enable-flush-all",
        "--failure-limit",
        "1000",
    ]);
    let mut px = Px::connect(&relay.addr());
    backup.kill();
    primary.stop();
    // Fails on the dead backup, times out on the stopped primary.
    px.write_raw("flush_all\r\n");
    let overflowed = wait_until(CONVERGE, || {
        let s = stats(&relay.addr());
        stat_u64(&s, "server:0:missed_overflowed") == 1
            && stat_u64(&s, "server:1:missed_overflowed") == 1
    });
    assert!(
        overflowed,
        "the lists never covered every key\n{:?}\n{}",
        stats(&relay.addr()),
        relay.output_tail(30)
    );
    primary.cont();
    // Past the settle period: the primary's flush is due, and postponed.
    std::thread::sleep(Duration::from_secs(1));
    let (cpu0, wall0) = (cpu_time(relay.pid()), Instant::now());
    // A window to measure over, not a wait for anything.
    std::thread::sleep(Duration::from_secs(2));
    let (cpu, wall) = (cpu_time(relay.pid()) - cpu0, wall0.elapsed());
    assert_eq!(
        stat_u64(&stats(&relay.addr()), "server:0:missed_overflowed"),
        1,
        "the primary was flushed after all: the test shows nothing"
    );
    assert!(
        cpu < wall / 4,
        "memrelay used {cpu:?} of CPU in {wall:?} while the flush waited"
    );
}

/// Settling is the server's, not the records': a key written all the
/// time while its primary is out is recorded again all the time, and must
/// still be served by the primary once it is back (were records cleared
/// only once a period old, it would never be, and a server down under
/// writes would never be marked up).
#[test]
fn a_primary_back_under_constant_writes_serves_again() {
    let mut cl = cluster(1, 1, &[]);
    let key = "hot-key";
    let mut px = cl.px();
    assert_eq!(px.set(key, 0, "v0"), "STORED\r\n");
    cl.primaries[0].kill();
    let stop = AtomicBool::new(false);
    let relay = cl.relay.addr();
    thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut px = Px::connect(&relay);
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                assert_eq!(px.set(key, 0, &format!("v{n}")), "STORED\r\n");
            }
        });
        // The writes go past it, and record the key again and again.
        let recorded = wait_until(CONVERGE, || {
            stat_u64(&stats(&relay), "server:0:missed_keys") == 1
        });
        cl.primaries[0].restart();
        // Back, settled, its list emptied: up, and writes reach it again.
        let serves = wait_until(CONVERGE, || {
            let s = stats(&relay);
            s.get("server:0:state").map(String::as_str) == Some("up")
                && stat_u64(&s, "server:0:missed_keys") == 0
        });
        stop.store(true, Ordering::SeqCst);
        writer.join().expect("the writer");
        assert!(recorded, "the key was never recorded\n{}", cl.diag());
        assert!(serves, "the primary never served again\n{}", cl.diag());
    });
    let last = peek(&cl.primaries[0], key).map(|i| i.value);
    assert!(
        last.is_some(),
        "no write reached the primary once it was back"
    );
}

/// The race itself, made certain: a write given up on reaches the primary
/// later than the prober first finds it answering, as a stopped server's
/// socket buffer does when one of its threads gets to it after another.
/// A real memcached cannot be told when to apply what its socket holds,
/// so a fake link (the kit's forwarder) holds the write for one and a half
/// timeouts. The delete clearing the record must come after it; were it
/// sent at once, the primary would keep v1 over v2 and serve it.
#[test]
fn a_write_given_up_on_that_lands_late_never_outlives_its_record() {
    let primary = Memcached::start();
    let backup = Memcached::start();
    let link = Forwarder::start(&primary.addr());
    let timeout = format!("{}ms", SETTLE.as_millis());
    let (p_addr, b_addr) = (link.addr(), backup.addr());
    let relay = Memrelay::start(&[
        "-s",
        &p_addr,
        "-b",
        &b_addr,
        "--timeout",
        &timeout,
        "-t",
        "2",
    ]);
    let key = "late-key";
    let mut px = Px::connect(&relay.addr());
    assert_eq!(px.set(key, 0, "v0"), "STORED\r\n");

    let late = SETTLE * 3 / 2;
    link.set(Fault::Delay(late));
    let sent = Instant::now();
    px.write_raw("set late-key 0 0 2\r\nv1\r\n");
    // The link reads the write at once and holds it; what comes after it
    // (the prober's looks, the later writes) passes. (Pacing only: were
    // the write not held, it would not time out, as checked below.)
    thread::sleep(Duration::from_millis(200));
    link.set(Fault::Pass);
    let r = px.c.read_until(line_done);
    assert_eq!(r.bytes, b"STORED\r\n", "set v1: {}", escape(&r.bytes));
    let s = stats(&relay.addr());
    assert!(
        stat_u64(&s, "server:0:missed_recorded") == 1,
        "the link did not hold the write long enough for it to time out: {s:?}"
    );
    assert_eq!(px.set(key, 0, "v2"), "STORED\r\n");

    // Until the record is gone and v1 has landed, and after: only v2.
    let settled = wait_until(CONVERGE, || {
        must_read(&mut px, key, "v2", "after v1 was given up on");
        let s = stats(&relay.addr());
        sent.elapsed() > late + Duration::from_millis(300)
            && stat_u64(&s, "server:0:missed_keys") == 0
    });
    assert!(
        settled,
        "the record was never cleared: {:?}",
        stats(&relay.addr())
    );
    must_read(&mut px, key, "v2", "once the primary serves again");
    let on_p = peek(&primary, key).map(|i| i.value);
    assert!(
        on_p.is_none() || on_p.as_deref() == Some("v2"),
        "v1 landed on the primary after the delete that cleared its record: it holds {on_p:?}"
    );
}

// ---------------------------------------------------------------------------
// 5. Backup down, then back
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BackupOutage {
    /// SIGKILL, then restart (empty) on the same port.
    Killed,
    /// SIGSTOP then SIGCONT: it keeps its old values.
    Stopped,
}

/// The backup misses writes while it is out; once it is back, the primary
/// dies: reads must give the new values or misses, never the backup's old
/// ones. `settle`: wait until the backup holds no old value before killing
/// the primary (else kill it right after the backup resumes).
fn backup_outage(outage: BackupOutage, settle: bool) {
    let mut cl = cluster(1, 1, &[]);
    let mut px = cl.px();
    let keys: Vec<String> = (0..20).map(|i| format!("bo{i}")).collect();
    for k in &keys {
        assert_eq!(px.set(k, 1, &format!("old-{k}")), "STORED\r\n");
    }
    let b = &cl.backups[0];
    for k in &keys {
        assert!(
            wait_until(CONVERGE, || peek(b, k).is_some()),
            "old {k} never mirrored"
        );
    }
    match outage {
        BackupOutage::Killed => cl.backups[0].kill(),
        BackupOutage::Stopped => cl.backups[0].stop(),
    }
    // New values (some keys deleted) through the proxy: the primary takes
    // them, the mirror fails.
    let mut truth: HashMap<String, Option<String>> = HashMap::new();
    for (i, k) in keys.iter().enumerate() {
        let t = Instant::now();
        if i % 4 == 3 {
            assert_eq!(px.line(&format!("delete {k}\r\n")), "DELETED\r\n");
            truth.insert(k.clone(), None);
        } else {
            let v = format!("new-{k}");
            assert_eq!(
                px.set(k, 2, &v),
                "STORED\r\n",
                "set {k} with the backup out"
            );
            truth.insert(k.clone(), Some(v));
        }
        assert!(
            t.elapsed() < ANSWER_BOUND,
            "write with the backup out took {:?}",
            t.elapsed()
        );
    }
    // Let the mirrors fail (the backup's connection times out) before it
    // comes back: wait until the proxy counts a mirror failure for each... at
    // least one.
    let addr = cl.relay.addr();
    assert!(
        wait_until(CONVERGE, || stat_u64(&stats(&addr), "mirror_failures") > 0),
        "no mirror failure counted while the backup was out"
    );
    match outage {
        BackupOutage::Killed => cl.backups[0].restart(),
        BackupOutage::Stopped => cl.backups[0].cont(),
    }
    let stale = |cl: &Cluster| -> Vec<String> {
        keys.iter()
            .filter_map(|k| {
                let got = peek(&cl.backups[0], k).map(|i| i.value);
                (got.is_some() && got != truth[k]).then(|| format!("{k}={got:?}"))
            })
            .collect()
    };
    if settle {
        let mut last = Vec::new();
        if !wait_until(CONVERGE, || {
            last = stale(&cl);
            last.is_empty()
        }) {
            let d = cl.diag();
            panic!(
                "{:?} backup still holds values older than writes it missed: {last:?}\n{d}",
                outage
            );
        }
    }
    cl.primaries[0].kill();
    let mut bad = Vec::new();
    // Read for a while: the backup's invalidation may be in progress.
    let end = Instant::now() + Duration::from_secs(1);
    let mut rounds = 0;
    while rounds < 2 || Instant::now() < end {
        rounds += 1;
        for k in &keys {
            let t = Instant::now();
            let got = px.get(k).map(|v| v.data);
            if t.elapsed() > ANSWER_BOUND {
                bad.push(format!("get {k} took {:?}", t.elapsed()));
            }
            if got.is_some() && got != truth[k] {
                bad.push(format!("get {k} served {got:?}, truth {:?}", truth[k]));
            }
        }
    }
    if !bad.is_empty() {
        bad.truncate(20);
        let d = cl.diag();
        panic!(
            "{outage:?} backup, primary then killed: stale or slow reads:\n  {}\n{d}",
            bad.join("\n  ")
        );
    }
}

#[test]
fn backup_killed_and_restarted_never_serves_old_values() {
    backup_outage(BackupOutage::Killed, true);
}

#[test]
fn backup_stopped_and_resumed_is_invalidated_before_serving() {
    backup_outage(BackupOutage::Stopped, true);
}

#[test]
fn backup_stopped_and_resumed_then_primary_dies_at_once() {
    backup_outage(BackupOutage::Stopped, false);
}

// ---------------------------------------------------------------------------
// 6. Both replicas of a key down
// ---------------------------------------------------------------------------

#[test]
fn both_replicas_down_reads_miss_fast_and_writes_fail() {
    let mut cl = cluster(2, 1, &[]);
    let live = cl.keys_on(0, "live", 3);
    let dead = cl.keys_on(1, "dead", 3);
    let mut px = cl.px();
    for k in live.iter().chain(&dead) {
        assert_eq!(px.set(k, 4, &format!("v-{k}")), "STORED\r\n");
    }
    cl.primaries[1].kill();
    cl.backups[0].kill();
    let check = |px: &mut Px, phase: &str| {
        for k in &dead {
            let (r, took) = px.retrieval_timed(&format!("get {k}\r\n"));
            assert!(took < ANSWER_BOUND, "{phase}: get {k} took {took:?}");
            assert_eq!(
                r.bytes,
                b"END\r\n",
                "{phase}: get {k} with both replicas down: {}",
                escape(&r.bytes)
            );
        }
        let mut all: Vec<&String> = live.iter().chain(&dead).collect();
        all.sort(); // interleave live and dead keys
        let req = format!(
            "get {}\r\n",
            all.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" ")
        );
        let (r, took) = px.retrieval_timed(&req);
        assert!(took < ANSWER_BOUND, "{phase}: multi-get took {took:?}");
        let got = parse_values(&r.bytes).unwrap_or_else(|e| panic!("{phase}: multi-get: {e}"));
        let want: Vec<(String, String)> = all
            .iter()
            .filter(|k| live.contains(k))
            .map(|k| (k.to_string(), format!("v-{k}")))
            .collect();
        let got: Vec<(String, String)> = got.into_iter().map(|v| (v.key, v.data)).collect();
        assert_eq!(got, want, "{phase}: multi-get over live and dead keys");
        let (r, took) = px.line_timed(&format!("set {} 0 0 1\r\nz\r\n", dead[0]));
        assert!(took < ANSWER_BOUND, "{phase}: set took {took:?}");
        assert!(
            r.bytes.starts_with(b"SERVER_ERROR ") && r.bytes.ends_with(b"\r\n"),
            "{phase}: set with both replicas down: {}",
            escape(&r.bytes)
        );
        // noreply: no answer, and the connection keeps working.
        px.write_raw(&format!("set {} 0 0 1 noreply\r\nz\r\n", dead[1]));
        let (r, took) = px.line_timed(&format!("delete {}\r\n", dead[2]));
        assert!(took < ANSWER_BOUND, "{phase}: delete took {took:?}");
        assert!(
            r.bytes.starts_with(b"SERVER_ERROR ") && r.bytes.ends_with(b"\r\n"),
            "{phase}: delete with both replicas down (after a noreply set): {}",
            escape(&r.bytes)
        );
        // A live key is still written (primary up; its mirror fails).
        assert_eq!(
            px.set(&live[0], 4, &format!("v-{}", live[0])),
            "STORED\r\n",
            "{phase}: set of a live key"
        );
    };
    check(&mut px, "just killed");
    cl.wait_state(1, "down", |cl| {
        let _ = cl.px().get("nudge-dead0");
    });
    cl.wait_state(2, "down", |_| {});
    check(&mut px, "marked down");
}

// ---------------------------------------------------------------------------
// 8. --no-miss-fallback
// ---------------------------------------------------------------------------

#[test]
fn no_miss_fallback_does_not_read_the_backup_on_a_plain_miss() {
    let mut cl = cluster(1, 1, &["--no-miss-fallback"]);
    poke(&cl.backups[0], "only-on-backup", 6, 0, "b");
    let mut px = cl.px();
    for _ in 0..3 {
        assert_eq!(
            px.get("only-on-backup"),
            None,
            "--no-miss-fallback: a primary miss must not be answered from the backup"
        );
    }
    assert_eq!(peek(&cl.primaries[0], "only-on-backup"), None, "no repair");
    // A primary failure still goes to the backup.
    cl.primaries[0].kill();
    let got = px.get("only-on-backup").map(|v| (v.flags, v.data));
    assert_eq!(
        got,
        Some((6, "b".into())),
        "primary dead: the backup serves"
    );
    let _ = cl.diag();

    // Control: without the flag the same miss is answered from the backup.
    let cl2 = cluster(1, 1, &[]);
    poke(&cl2.backups[0], "only-on-backup", 6, 0, "b");
    let got = cl2.px().get("only-on-backup").map(|v| (v.flags, v.data));
    assert_eq!(
        got,
        Some((6, "b".into())),
        "default: miss falls back to the backup"
    );
}

// ---------------------------------------------------------------------------
// 9. Two proxies, same servers
// ---------------------------------------------------------------------------

#[test]
fn two_proxies_on_the_same_servers_route_identically() {
    let mut cl = cluster(3, 2, &[]);
    let other = Memrelay::start(&cl.args);
    let mut a = cl.px();
    let mut b = Px::connect(&other.addr());
    let keys: Vec<String> = (0..60).map(|i| format!("two-{i}")).collect();
    for k in &keys {
        assert_eq!(a.set(k, 1, &format!("A-{k}")), "STORED\r\n");
    }
    for k in &keys {
        let p = cl.primary_of(k);
        // On the primary ketama picks (and on no other primary).
        for (i, m) in cl.primaries.iter().enumerate() {
            let has = peek(m, k).is_some();
            assert_eq!(has, i == p, "{k}: on primary {i}? (its primary is {p})");
        }
        assert_eq!(
            b.get(k).map(|v| v.data),
            Some(format!("A-{k}")),
            "{k} set through proxy A, read through proxy B"
        );
    }
    for k in &keys {
        assert_eq!(b.set(k, 1, &format!("B-{k}")), "STORED\r\n");
        let p = cl.primary_of(k);
        assert_eq!(
            peek(&cl.primaries[p], k).map(|i| i.value),
            Some(format!("B-{k}")),
            "{k} set through B lands where A put it"
        );
        let bk = cl.backup_of(k);
        assert!(
            wait_until(CONVERGE, || peek(&cl.backups[bk], k).map(|i| i.value)
                == Some(format!("B-{k}"))),
            "{k}: B's mirror went to another backup than {bk}"
        );
        assert!(
            peek(&cl.backups[1 - bk], k).is_none(),
            "{k} on the wrong backup"
        );
    }
    // With a primary dead, both fail over to the same backup.
    cl.primaries[0].kill();
    for k in keys.iter().filter(|k| cl.primary_of(k) == 0) {
        assert_eq!(a.set(k, 1, &format!("A2-{k}")), "STORED\r\n");
        assert_eq!(b.get(k).map(|v| v.data), Some(format!("A2-{k}")), "{k}");
    }
    let _ = cl.diag();
}

// ---------------------------------------------------------------------------
// 7 and 10. Model-based checks under failures
// ---------------------------------------------------------------------------

/// What the chaos thread may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chaos {
    /// Kill and restart primary 0 only, quickly.
    FlapPrimary,
    /// Kill / restart / SIGSTOP / SIGCONT any primary; never the backup.
    Primaries,
    /// As `Primaries`, and sometimes take the backup out briefly while all
    /// primaries are healthy (never a key's primary and backup at once).
    PrimariesAndBackup,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    Up,
    Stopped,
    Killed,
}

struct ModelCfg {
    clients: usize,
    keys_per_client: usize,
    run_for: Duration,
    chaos: Chaos,
    primaries: usize,
    /// Connections each client spreads its (still sequential) operations
    /// over: with more than one, a key's consecutive operations usually go
    /// through different proxy worker threads.
    conns: usize,
}

/// One client thread: random sets, gets and deletes on its own keys, each
/// reply judged by the kit's model checker (the one memrelay-chaos uses).
/// Returns its tally and what it knows of its keys.
fn model_client(
    addr: &str,
    t: usize,
    cfg: &ModelCfg,
    start: Instant,
    stop: &AtomicBool,
) -> (Tally, Vec<KeyModel>) {
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15 ^ ((t as u64 + 1) * 0x1000_0001));
    // Every value of key i starts with "t:i:" (its tag: an older value of
    // the key is stale, anything else is wrong). The key's primary is not
    // needed: no replica is known to be untouched (see `ctx`).
    let mut keys: Vec<KeyModel> = (0..cfg.keys_per_client)
        .map(|i| KeyModel::new(format!("c{t}-k{i}"), format!("{t}:{i}:"), false, 0))
        .collect();
    let ctx = model_ctx(t, start, "during chaos");
    let mut tally = Tally::new();
    let mut conns: Vec<Option<Conn>> = (0..cfg.conns.max(1)).map(|_| None).collect();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let k = rng.below(keys.len() as u64) as usize;
        let roll = rng.below(100);
        let ci = rng.below(conns.len() as u64) as usize;
        let op = if roll < 45 {
            seq += 1;
            let item = model::Item {
                data: format!("{t}:{k}:{seq}"),
                flags: 0,
            };
            Op::Set { k, item }
        } else if roll < 60 {
            Op::Delete { k }
        } else {
            Op::Get { ks: vec![k] }
        };
        let conn = conns[ci].get_or_insert_with(|| connect(addr));
        if !model::exchange(conn, &ctx, &mut tally, &mut keys, &[op], CLIENT_DEADLINE) {
            conns[ci] = None;
        }
    }
    (tally, keys)
}

/// No replica is ever counted as untouched: the chaos thread does not
/// report what it does, so a miss is always allowed here (memrelay-chaos,
/// which tracks it, also checks misses).
fn no_replica_known(_primary: usize, _since: Instant) -> bool {
    false
}

/// How the model judges client `t`'s replies: answered within
/// ANSWER_BOUND, misses allowed (`no_replica_known`).
fn model_ctx(t: usize, start: Instant, phase: &str) -> Ctx<'_> {
    Ctx {
        start,
        client: t,
        phase,
        bound: ANSWER_BOUND,
        live_replica: &no_replica_known,
        strict_writes: false,
        in_flight: std::time::Duration::ZERO,
    }
}

fn connect(addr: &str) -> Conn {
    Conn::connect(addr).unwrap_or_else(|e| panic!("{e}"))
}

/// Reads every key once through a fresh connection: each must be its
/// latest acknowledged value (or an unknown-outcome one) or a miss, and
/// must be answered. Returns the problems.
fn final_reads(
    addr: &str,
    t: usize,
    keys: &mut [KeyModel],
    start: Instant,
    phase: &str,
) -> Vec<String> {
    let ctx = model_ctx(t, start, phase);
    let mut tally = Tally::new();
    let mut conn = connect(addr);
    for k in 0..keys.len() {
        let op = Op::Get { ks: vec![k] };
        if !model::exchange(&mut conn, &ctx, &mut tally, keys, &[op], CLIENT_DEADLINE) {
            conn = connect(addr);
        }
    }
    let mut bad = tally.details.clone();
    if tally.failures > 0 {
        bad.push(format!(
            "{phase}: client {t}: {} final read(s) got no complete reply",
            tally.failures
        ));
    }
    if tally.violations() > tally.details.len() as u64 {
        bad.push(format!(
            "{phase}: client {t}: {} violations in all",
            tally.violations()
        ));
    }
    bad
}

/// The chaos thread: takes servers out and brings them back until `stop`,
/// then brings everything back. Returns its log.
fn chaos(
    primaries: &mut [Memcached],
    backups: &mut [Memcached],
    kind: Chaos,
    stop: &AtomicBool,
    start: Instant,
) -> Vec<String> {
    let mut rng = Rng::new(0x2545_f491_4f6c_dd1d ^ start.elapsed().as_nanos() as u64);
    let mut state = vec![Run::Up; primaries.len()];
    let mut log = Vec::new();
    let stamp = |log: &mut Vec<String>, what: String| {
        log.push(format!("[{:>6}ms] {what}", start.elapsed().as_millis()));
    };
    while !stop.load(Ordering::Relaxed) {
        // Pacing only: outcomes are never decided by these sleeps.
        let pause = match kind {
            Chaos::FlapPrimary => 80 + rng.below(220),
            _ => 150 + rng.below(450),
        };
        thread::sleep(Duration::from_millis(pause));
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if kind == Chaos::FlapPrimary {
            match state[0] {
                Run::Up => {
                    primaries[0].kill();
                    state[0] = Run::Killed;
                    stamp(&mut log, "kill primary 0".into());
                }
                _ => {
                    primaries[0].restart();
                    state[0] = Run::Up;
                    stamp(&mut log, "restart primary 0".into());
                }
            }
            continue;
        }
        let all_up = state.iter().all(|s| *s == Run::Up);
        if kind == Chaos::PrimariesAndBackup && all_up && rng.below(100) < 25 {
            // The backup out briefly, every primary healthy meanwhile.
            let kill = rng.below(2) == 0;
            if kill {
                backups[0].kill();
                stamp(&mut log, "kill backup".into());
            } else {
                backups[0].stop();
                stamp(&mut log, "SIGSTOP backup".into());
            }
            thread::sleep(Duration::from_millis(200 + rng.below(400)));
            if kill {
                backups[0].restart();
                stamp(&mut log, "restart backup".into());
            } else {
                backups[0].cont();
                stamp(&mut log, "SIGCONT backup".into());
            }
            continue;
        }
        let i = rng.below(primaries.len() as u64) as usize;
        let roll = rng.below(100);
        match state[i] {
            Run::Up if roll < 50 => {
                primaries[i].kill();
                state[i] = Run::Killed;
                stamp(&mut log, format!("kill primary {i}"));
            }
            Run::Up => {
                primaries[i].stop();
                state[i] = Run::Stopped;
                stamp(&mut log, format!("SIGSTOP primary {i}"));
            }
            Run::Stopped if roll < 20 => {
                primaries[i].kill();
                state[i] = Run::Killed;
                stamp(&mut log, format!("kill (stopped) primary {i}"));
            }
            Run::Stopped => {
                primaries[i].cont();
                state[i] = Run::Up;
                stamp(&mut log, format!("SIGCONT primary {i}"));
            }
            Run::Killed => {
                primaries[i].restart();
                state[i] = Run::Up;
                stamp(&mut log, format!("restart primary {i}"));
            }
        }
    }
    for (i, s) in state.iter().enumerate() {
        match s {
            Run::Up => {}
            Run::Stopped => primaries[i].cont(),
            Run::Killed => primaries[i].restart(),
        }
    }
    stamp(&mut log, "all servers back".into());
    log
}

/// Clients hammer their own keys while the chaos thread breaks servers;
/// every read is checked against each client's model.
fn run_model(name: &str, cfg: ModelCfg) {
    let mut cl = cluster(cfg.primaries, 1, &[]);
    let addr = cl.relay.addr();
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let (results, log) = thread::scope(|s| {
        let (primaries, backups) = (&mut cl.primaries, &mut cl.backups);
        let stop = &stop;
        let cfg = &cfg;
        let chaos_h = s.spawn(move || chaos(primaries, backups, cfg.chaos, stop, start));
        let clients: Vec<_> = (0..cfg.clients)
            .map(|t| {
                let addr = addr.clone();
                s.spawn(move || model_client(&addr, t, cfg, start, stop))
            })
            .collect();
        // Pacing: how long the run lasts.
        thread::sleep(cfg.run_for);
        stop.store(true, Ordering::Relaxed);
        let results: Vec<_> = clients.into_iter().map(|h| h.join().unwrap()).collect();
        (results, chaos_h.join().unwrap())
    });
    let mut total = Tally::new();
    let mut violations = Vec::new();
    let mut results = results;
    for (t, (tally, keys)) in results.iter_mut().enumerate() {
        total.merge(tally);
        violations.extend(tally.details.iter().cloned());
        if tally.violations() > tally.details.len() as u64 {
            violations.push(format!(
                "client {t}: {} violations in all",
                tally.violations()
            ));
        }
        // Right after every server is back: invalidation may be under way.
        violations.extend(final_reads(&addr, t, keys, start, "after chaos"));
    }
    // Once the proxy sees every server up again.
    let n = cl.primaries.len() + cl.backups.len();
    let all_up = wait_until(Duration::from_secs(10), || {
        let s = stats(&addr);
        (0..n).all(|i| s.get(&format!("server:{i}:state")).map(String::as_str) == Some("up"))
    });
    if !all_up {
        violations.push(format!(
            "servers not all marked up 10 s after they came back: {:?}",
            stats(&addr)
                .into_iter()
                .filter(|(k, _)| k.ends_with(":state"))
                .collect::<Vec<_>>()
        ));
    }
    for (t, (_, keys)) in results.iter_mut().enumerate() {
        violations.extend(final_reads(&addr, t, keys, start, "all up"));
    }
    let s = stats(&addr);
    let errors = total.server_errors + total.failures;
    println!(
        "{name}: {:?}, {} clients x {} keys, {} chaos events: {} ops ({} sets, {} deletes, {} gets: {} hits, {} misses), {} errors, {} late (> {ANSWER_BOUND:?}), max latency {:?}; proxy failovers {}, backup_hits {}, repairs {}, mirror_failures {}",
        cfg.run_for,
        cfg.clients,
        cfg.keys_per_client,
        log.len(),
        total.ops(),
        total.sets,
        total.deletes,
        total.gets,
        total.hits,
        total.misses,
        errors,
        total.late,
        total.max_latency,
        s.get("failovers").cloned().unwrap_or_default(),
        s.get("backup_hits").cloned().unwrap_or_default(),
        s.get("repairs").cloned().unwrap_or_default(),
        s.get("mirror_failures").cloned().unwrap_or_default(),
    );
    // With the backup never out, a write always has somewhere to go.
    if cfg.chaos != Chaos::PrimariesAndBackup && errors > 0 {
        violations.push(format!(
            "{errors} requests failed although every key's backup stayed up"
        ));
    }
    if !violations.is_empty() {
        violations.truncate(40);
        let d = cl.diag();
        panic!(
            "{name}: {} problem(s):\n  {}\nchaos log:\n  {}\n{d}",
            violations.len(),
            violations.join("\n  "),
            log.join("\n  ")
        );
    }
    assert!(
        total.ops() > 100,
        "{name}: only {} operations ran",
        total.ops()
    );
}

#[test]
fn flapping_primary_never_serves_older_values() {
    run_model(
        "flapping",
        ModelCfg {
            clients: 1,
            keys_per_client: 20,
            run_for: Duration::from_secs(4),
            chaos: Chaos::FlapPrimary,
            primaries: 2,
            conns: 1,
        },
    );
}

#[test]
fn model_concurrent_clients_with_primaries_failing() {
    run_model(
        "model/primaries",
        ModelCfg {
            clients: 8,
            keys_per_client: 8,
            run_for: Duration::from_secs(10),
            chaos: Chaos::Primaries,
            primaries: 2,
            conns: 1,
        },
    );
}

#[test]
fn model_concurrent_clients_with_primaries_and_backup_failing() {
    run_model(
        "model/primaries+backup",
        ModelCfg {
            clients: 8,
            keys_per_client: 8,
            run_for: Duration::from_secs(8),
            chaos: Chaos::PrimariesAndBackup,
            primaries: 2,
            conns: 1,
        },
    );
}

// ---------------------------------------------------------------------------
// stats
// ---------------------------------------------------------------------------

#[test]
fn stats_show_server_states_and_ha_counters() {
    let mut cl = cluster(1, 1, &[]);
    let mut px = cl.px();
    assert_eq!(px.set("st", 0, "v1"), "STORED\r\n");
    let s = stats(&cl.relay.addr());
    for name in ["failovers", "backup_hits", "repairs", "mirror_failures"] {
        stat_u64(&s, name);
    }
    for i in 0..2 {
        assert_eq!(
            s.get(&format!("server:{i}:state")).map(String::as_str),
            Some("up"),
            "server:{i}:state: {s:?}"
        );
        for name in ["missed_keys", "invalidated"] {
            stat_u64(&s, &format!("server:{i}:{name}"));
        }
    }
    // A write that times out on the primary is a failover and a missed key;
    // once the primary resumes, the key is invalidated on it.
    cl.primaries[0].stop();
    assert_eq!(px.set("st", 0, "v2"), "STORED\r\n");
    let s = stats(&cl.relay.addr());
    assert!(stat_u64(&s, "failovers") >= 1, "{s:?}");
    assert!(stat_u64(&s, "server:0:missed_keys") >= 1, "{s:?}");
    cl.primaries[0].cont();
    let addr = cl.relay.addr();
    let mut last = HashMap::new();
    let done = wait_until(CONVERGE, || {
        last = stats(&addr);
        stat_u64(&last, "server:0:invalidated") >= 1 && stat_u64(&last, "server:0:missed_keys") == 0
    });
    assert!(
        done,
        "key never invalidated on the resumed primary: {last:?}"
    );
    // Killed and marked down.
    cl.primaries[0].kill();
    cl.wait_state(0, "down", |cl| {
        let _ = cl.px().get("st");
    });
    assert_eq!(px.get("st").map(|v| v.data), Some("v2".into()));
}

#[test]
fn model_clients_spread_over_proxy_workers_with_primaries_failing() {
    run_model(
        "model/primaries, 3 connections per client",
        ModelCfg {
            clients: 6,
            keys_per_client: 6,
            run_for: Duration::from_secs(8),
            chaos: Chaos::Primaries,
            primaries: 2,
            conns: 3,
        },
    );
}

/// Sequential writes to the same keys through different connections (so
/// different proxy workers, each with its own connection to the backup):
/// the backup must end with the primary's latest item, not an older one
/// whose mirror overtook a newer one.
#[test]
fn mirrors_from_different_workers_keep_the_latest_value() {
    let mut cl = cluster(1, 1, &["-t", "4"]);
    let mut pxs: Vec<Px> = (0..6).map(|_| cl.px()).collect();
    let keys: Vec<String> = (0..40).map(|i| format!("order{i}")).collect();
    let mut rng = Rng::new(0x1234_5678_9abc_def1);
    let mut last: HashMap<String, Option<String>> = HashMap::new();
    for n in 0..3000 {
        let k = &keys[rng.below(keys.len() as u64) as usize];
        let px = &mut pxs[n % 6];
        if rng.below(10) == 0 {
            let r = px.line(&format!("delete {k}\r\n"));
            assert!(
                r == "DELETED\r\n" || r == "NOT_FOUND\r\n",
                "delete {k}: {r:?}"
            );
            last.insert(k.clone(), None);
        } else {
            let v = format!("v{n}");
            assert_eq!(px.set(k, 0, &v), "STORED\r\n");
            last.insert(k.clone(), Some(v));
        }
    }
    for (k, want) in &last {
        assert_eq!(
            &peek(&cl.primaries[0], k).map(|i| i.value),
            want,
            "primary's {k}"
        );
    }
    let wrong = backup_mismatches(&cl.backups[0], &last);
    if !wrong.is_empty() {
        let d = cl.diag();
        panic!(
            "backup differs from primary after the mirrors settled:\n  {}\n{d}",
            wrong.join("\n  ")
        );
    }
}

/// All servers up. A delete acknowledged through one connection, then a get
/// through another (often another proxy worker): the primary misses, so the
/// proxy asks the backup, whose copy is deleted by a mirror that may not
/// have landed yet. The get must still miss (the client saw the delete), and
/// nothing may bring the value back on the primary (the read repair `add`).
#[test]
fn a_get_after_an_acknowledged_delete_never_resurrects_the_value() {
    let mut cl = cluster(1, 1, &["-t", "4"]);
    let mut pxs: Vec<Px> = (0..8).map(|_| cl.px()).collect();
    let mut stale = Vec::new();
    let rounds = 1500;
    for n in 0..rounds {
        let k = format!("del{n}");
        let v = format!("v{n}");
        let (a, b) = (n % 8, (n + 3) % 8);
        assert_eq!(pxs[a].set(&k, 0, &v), "STORED\r\n");
        let r = pxs[b].line(&format!("delete {k}\r\n"));
        assert_eq!(r, "DELETED\r\n", "delete {k}");
        let got = pxs[(n + 5) % 8].get(&k).map(|v| v.data);
        if got.is_some() {
            stale.push(format!("round {n}: get {k} after DELETED served {got:?}"));
        }
    }
    // And nothing resurrected for good.
    let gone: HashMap<String, Option<String>> =
        (0..rounds).map(|n| (format!("del{n}"), None)).collect();
    let mut resurrected = backup_mismatches(&cl.primaries[0], &gone);
    resurrected.extend(backup_mismatches(&cl.backups[0], &gone));
    if !stale.is_empty() || !resurrected.is_empty() {
        stale.truncate(10);
        let s = stats(&cl.relay.addr());
        let d = cl.diag();
        panic!(
            "all servers up, {rounds} set/delete/get rounds over 8 connections:\n  \
             {} stale get(s) after an acknowledged delete, e.g.:\n  {}\n  \
             {} key(s) still present after the delete: {:?}\n  \
             (backup_hits {}, repairs {})\n{d}",
            stale.len(),
            stale.join("\n  "),
            resurrected.len(),
            resurrected.iter().take(10).collect::<Vec<_>>(),
            s["backup_hits"],
            s["repairs"],
        );
    }
}

/// The same, with `-i 4` and the backup pausing briefly (SIGSTOP for far less than
/// --timeout: no mirror fails, nothing is recorded as missed), so that the
/// mirrors queued on the workers' separate backup connections are
/// delivered together when it resumes, in whatever order memcached reads
/// those connections. Sequential, acknowledged writes must still leave the
/// backup with the primary's latest item; and once the primary dies, reads
/// must give the latest value or a miss, never an older one.
#[test]
fn mirrors_from_different_workers_keep_the_latest_value_when_the_backup_lags() {
    // -i 4: each worker keeps four connections to each server and spreads
    // requests over them, so even one worker's mirrors travel apart.
    let mut cl = cluster(1, 1, &["-t", "4", "-i", "4", "--timeout", "3s"]);
    let mut pxs: Vec<Px> = (0..8).map(|_| cl.px()).collect();
    let keys: Vec<String> = (0..20).map(|i| format!("lag{i}")).collect();
    for k in &keys {
        assert_eq!(pxs[0].set(k, 0, "v0"), "STORED\r\n");
    }
    let b = &cl.backups[0];
    for k in &keys {
        assert!(
            wait_until(CONVERGE, || peek(b, k).is_some()),
            "{k} not mirrored"
        );
    }
    let mut last: HashMap<String, Option<String>> = HashMap::new();
    // Writes wait for their copies on the backup (that is what keeps them in
    // order), so the backup is resumed from another thread while they wait.
    let backup_pid = cl.backups[0].pid() as libc::pid_t;
    // SAFETY: plain kill(2) on a child process this test started.
    unsafe { libc::kill(backup_pid, libc::SIGSTOP) };
    let paused = Instant::now();
    let resumer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(45));
        // SAFETY: as above.
        unsafe { libc::kill(backup_pid, libc::SIGCONT) };
    });
    for (j, k) in keys.iter().enumerate() {
        // v1..v7 in order, each through the next connection; every third
        // key ends with a delete instead.
        for n in 1..=7 {
            let px = &mut pxs[(j + n) % 8];
            if n == 7 && j % 3 == 0 {
                assert_eq!(px.line(&format!("delete {k}\r\n")), "DELETED\r\n");
                last.insert(k.clone(), None);
            } else {
                let v = format!("v{n}");
                assert_eq!(px.set(k, 0, &v), "STORED\r\n");
                last.insert(k.clone(), Some(v));
            }
        }
    }
    let held = paused.elapsed();
    resumer.join().expect("resumer thread");
    assert!(
        held < Duration::from_secs(2),
        "writes took {held:?} with the backup paused for 45 ms: well under --timeout, they should not time out"
    );
    let s = stats(&cl.relay.addr());
    for k in &keys {
        assert_eq!(
            &peek(&cl.primaries[0], k).map(|i| i.value),
            &last[k],
            "primary's {k}"
        );
    }
    let wrong = backup_mismatches(&cl.backups[0], &last);
    // What a client sees once the primary is gone.
    cl.primaries[0].kill();
    let mut stale = Vec::new();
    let mut px = cl.px();
    for k in &keys {
        let got = px.get(k).map(|v| v.data);
        if got.is_some() && got != last[k] {
            stale.push(format!(
                "get {k} served {got:?}, latest acknowledged {:?}",
                last[k]
            ));
        }
    }
    if !wrong.is_empty() || !stale.is_empty() {
        let d = cl.diag();
        panic!(
            "after sequential acknowledged writes over 8 connections (backup paused {held:?}, \
             mirror_failures {}):\n  backup differs from primary for {} of {} keys:\n  {}\n  \
             with the primary then killed, {} stale read(s):\n  {}\n{d}",
            s["mirror_failures"],
            wrong.len(),
            keys.len(),
            wrong.join("\n  "),
            stale.len(),
            stale.join("\n  ")
        );
    }
}

/// Waits (one deadline for all keys) until `m` holds exactly `want` for
/// every key; returns the keys that still differ, as "key: want, has".
fn backup_mismatches(m: &Memcached, want: &HashMap<String, Option<String>>) -> Vec<String> {
    let mut wrong = Vec::new();
    wait_until(CONVERGE, || {
        wrong = want
            .iter()
            .filter_map(|(k, w)| {
                let has = peek(m, k).map(|i| i.value);
                (&has != w).then(|| format!("{k}: expected {w:?}, holds {has:?}"))
            })
            .collect();
        wrong.is_empty()
    });
    wrong.sort();
    wrong
}

/// A read repair must not copy back a value older than a write that
/// bypassed the primary. The primary lacks the key (restarted empty), the
/// backup holds it. A client pipelines `get k` and `incr k 7`: both miss on
/// the primary and fall back to the backup, where the get reads the old
/// value before the incr changes it; the get's repair then adds the old
/// value to the primary. Without protection the primary serves the
/// pre-increment value from then on (the chaos tool's stale incr/append).
#[test]
fn a_read_repair_never_copies_back_a_value_older_than_a_fallen_back_write() {
    let mut cl = cluster(1, 1, &["-t", "1"]);
    let mut px = cl.px();
    for (n, cmd) in [
        "incr {k} 7\r\n",
        "append {k} 0 0 1\r\nx\r\n",
        "prepend {k} 0 0 1\r\nx\r\n",
        "decr {k} 7\r\n",
    ]
    .iter()
    .enumerate()
    {
        for round in 0..20 {
            let k = format!("rr{n}x{round}");
            poke(&cl.backups[0], &k, 5, 0, "100");
            let write = cmd.replace("{k}", &k);
            // Pipelined: the get's repair and the write's fallback race.
            let r =
                px.c.send_until(format!("get {k}\r\n{write}").as_bytes(), |b| {
                    let text = String::from_utf8_lossy(b);
                    text.split_once("END\r\n")
                        .is_some_and(|(_, rest)| rest.ends_with("\r\n"))
                });
            let text = String::from_utf8_lossy(&r.bytes).into_owned();
            assert!(
                text.starts_with(&format!("VALUE {k} 5 3\r\n100\r\nEND\r\n")),
                "{write:?}: {text:?}"
            );
            let after = text.split("END\r\n").nth(1).unwrap_or("").to_string();
            let want = match n {
                0 => "107",
                1 => "100x",
                2 => "x100",
                _ => "93",
            };
            let acked = match n {
                0 | 3 => format!("{want}\r\n"),
                _ => "STORED\r\n".to_string(),
            };
            assert_eq!(after, acked, "{write:?}");
            // Every later read sees the write.
            for _ in 0..3 {
                let got = px.get(&k).map(|v| v.data);
                // memcached may keep a decremented number's length, padded
                // with spaces.
                if got.as_deref().map(str::trim_end) != Some(want) {
                    let d = cl.diag();
                    panic!(
                        "{write:?} answered {acked:?}, then get {k} served {got:?} \
                         (primary holds {:?}, backup {:?})\n{d}",
                        peek(&cl.primaries[0], &k),
                        peek(&cl.backups[0], &k)
                    );
                }
            }
        }
    }
}

/// A write that falls back from a primary without the item to a backup that
/// then fails gets the primary's true answer, not a SERVER_ERROR: the
/// primary was up and answered (the chaos tool's "wrong" replies with the
/// backup paused).
#[test]
fn a_fall_back_write_whose_backup_fails_gets_the_primarys_answer() {
    let mut cl = cluster(1, 1, &["-t", "1"]);
    let mut px = cl.px();
    // Items only the backup holds (as after the primary restarted empty):
    // each write misses on the primary and falls back to the backup.
    for k in ["gone1", "gone2", "gone3", "gone4"] {
        poke(&cl.backups[0], k, 0, 0, "7");
    }
    cl.backups[0].stop();
    for (req, want) in [
        ("delete gone1\r\n", "NOT_FOUND\r\n"),
        ("incr gone2 1\r\n", "NOT_FOUND\r\n"),
        ("append gone3 0 0 1\r\nx\r\n", "NOT_STORED\r\n"),
        ("touch gone4 10\r\n", "NOT_FOUND\r\n"),
    ] {
        let (r, took) = px.line_timed(req);
        assert_eq!(
            String::from_utf8_lossy(&r.bytes),
            want,
            "{req:?} with the backup paused"
        );
        assert!(took < ANSWER_BOUND, "{req:?} took {took:?}");
    }
    cl.backups[0].cont();
    // The paused backup may have applied those writes (or not: the client
    // was told they did not happen): it is recorded as having missed the
    // keys, so its copies are invalidated before they are served again.
    for k in ["gone1", "gone2", "gone3", "gone4"] {
        assert_eq!(px.get(k).map(|v| v.data), None, "{k}");
    }
    assert!(
        wait_until(CONVERGE, || ["gone2", "gone3", "gone4"]
            .iter()
            .all(|k| peek(&cl.backups[0], k).is_none())),
        "the backup kept its copies"
    );
}

/// A client that resets its connection while its write is on the primary:
/// the primary applies it after the client is gone. Whether the session
/// still finishes the write (it noticed the reset while reading) or ends
/// at once (a reply write failed; then nobody copies the write and the
/// backup is recorded as having missed the key), the backup must not keep
/// the older item: a read after the primary dies would serve it, though
/// other clients may have read the new one.
#[test]
fn a_write_whose_client_left_never_leaves_the_backup_behind() {
    let mut cl = cluster(1, 1, &["-t", "1", "--timeout", "3s"]);
    let mut px = cl.px();
    assert_eq!(px.set("left", 0, "10"), "STORED\r\n");
    assert_eq!(
        peek(&cl.backups[0], "left").map(|i| i.value).as_deref(),
        Some("10")
    );
    cl.primaries[0].stop();
    {
        use std::io::Write;
        let mut gone = std::net::TcpStream::connect(cl.relay.addr()).unwrap();
        gone.write_all(b"version\r\nincr left 5\r\n").unwrap();
        // Until memrelay has read it and sent the incr to the paused
        // primary (its incr count moves at dispatch).
        assert!(
            wait_until(CONVERGE, || support::stat_u64(&cl.relay.addr(), "cmd_incr")
                >= 1),
            "the incr was never dispatched"
        );
        socket2::SockRef::from(&gone)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    } // closed with a reset
    cl.primaries[0].cont();
    assert!(
        wait_until(CONVERGE, || peek(&cl.primaries[0], "left")
            .map(|i| i.value)
            .as_deref()
            == Some("15")),
        "the primary never applied the incr"
    );
    let settled = wait_until(CONVERGE, || {
        let b = peek(&cl.backups[0], "left").map(|i| i.value);
        b.is_none() || b.as_deref() == Some("15")
    });
    assert!(
        settled,
        "the backup kept {:?} while the primary holds 15",
        peek(&cl.backups[0], "left")
    );
}

/// A second backup tier (`--backup-tier`): every write reaches all three
/// replicas; with the primary and the first backup dead, reads and writes
/// are served by the second backup tier; once they return (empty), nothing
/// older is served and the value written meanwhile is read back.
#[test]
fn a_second_backup_tier_serves_when_the_first_two_are_down() {
    let primary = Memcached::start();
    let first = Memcached::start();
    let second = Memcached::start();
    let relay = Memrelay::start(&[
        "-t",
        "1",
        "--timeout",
        TIMEOUT,
        "--connect-timeout",
        TIMEOUT,
        "-s",
        &primary.addr(),
        "-b",
        &first.addr(),
        "--backup-tier",
        &second.addr(),
    ]);
    let mut px = Px::connect(&relay.addr());
    assert_eq!(px.set("tiered", 3, "one"), "STORED\r\n");
    for m in [&primary, &first, &second] {
        assert_eq!(
            peek(m, "tiered").map(|i| (i.value, i.flags)),
            Some(("one".to_string(), 3)),
            "{} did not get the write",
            m.addr()
        );
    }
    let (mut primary, mut first) = (primary, first);
    primary.kill();
    first.kill();
    // A read asks one more tier after a failed one: until the two dead
    // servers are marked down (the failed reads count), it may miss.
    let served = wait_until(CONVERGE, || {
        px.get("tiered").map(|v| v.data).as_deref() == Some("one")
    });
    assert!(served, "the second backup tier never served the key");
    let (r, took) = px.line_timed("set tiered 4 0 3\r\ntwo\r\n");
    assert_eq!(String::from_utf8_lossy(&r.bytes), "STORED\r\n");
    assert!(took < ANSWER_BOUND, "the write took {took:?}");
    assert_eq!(
        peek(&second, "tiered").map(|i| i.value).as_deref(),
        Some("two")
    );
    // Both come back empty: the value written meanwhile is what is read.
    primary.restart();
    first.restart();
    let ok = wait_until(CONVERGE, || {
        px.get("tiered").map(|v| v.data).as_deref() == Some("two")
    });
    assert!(ok, "after the restarts: {:?}", px.get("tiered"));
    for _ in 0..20 {
        assert_eq!(px.get("tiered").map(|v| v.data).as_deref(), Some("two"));
    }
}

/// A write to the backup given up on (held by a silent link) must not
/// land there once the link heals, over a newer value another proxy put
/// there meanwhile: memrelay resets the connection it gave up on, and
/// the link drops what a reset sender sent.
#[test]
fn a_backup_write_given_up_on_does_not_land_when_the_link_heals() {
    let primary = Memcached::start();
    let backup = Memcached::start();
    let link = Forwarder::start(&backup.addr());
    let relay = Memrelay::start(&[
        "-s",
        &primary.addr(),
        "-b",
        &link.addr(),
        "--timeout",
        TIMEOUT,
        "-t",
        "1",
    ]);
    let key = "held-key";
    let mut px = Px::connect(&relay.addr());
    assert_eq!(px.set(key, 0, "v0"), "STORED\r\n");
    link.set(Fault::Blackhole);
    assert_eq!(px.set(key, 0, "v1"), "STORED\r\n");
    assert!(wait_until(CONVERGE, || link.held_bytes() > 0));
    let recorded = wait_until(CONVERGE, || {
        let s = stats(&relay.addr());
        stat_u64(&s, "server:1:missed_keys") == 1
    });
    assert!(recorded, "{:?}", stats(&relay.addr()));
    // Another proxy, reaching the backup, writes a newer value there.
    let mut c = direct_client(&backup);
    let r = c.send_until(format!("set {key} 0 0 2\r\nv2\r\n").as_bytes(), line_done);
    assert_eq!(r.bytes, b"STORED\r\n");
    link.set(Fault::Pass);
    assert!(wait_until(CONVERGE, || link.holding() == 0 && link.held_bytes() == 0));
    let on_backup = peek(&backup, key).map(|i| i.value);
    assert!(
        on_backup.is_none() || on_backup.as_deref() == Some("v2"),
        "the backup holds {on_backup:?}"
    );
}
