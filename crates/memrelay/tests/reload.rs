//! Reloading the configuration (SIGHUP, `memrelay reload`) against real
//! memcached processes: servers added and removed under load without a
//! client error or a dropped connection, an invalid file refused with the
//! running configuration kept, the admin command's answers, and a timeout
//! that changes at once.
#![allow(clippy::panic, clippy::unwrap_used)]

mod support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use support::{
    complete_retrieval, escape, stat_u64, stats, wait_until, Client, End, Memcached, Memrelay,
    TempDir,
};

/// Longest wait for a reload to be logged, or for what follows it.
const DEADLINE: Duration = Duration::from_secs(15);
const RELOADED: &str = "configuration reloaded";
/// The configuration file's name in each test's directory.
const FILE: &str = "memrelay.toml";

/// A configuration file's text: the servers, and `extra` tables.
fn config(primaries: &[&Memcached], backups: &[&Memcached], extra: &str) -> String {
    let list = |servers: &[&Memcached]| {
        let names: Vec<String> = servers
            .iter()
            .map(|m| format!("\"{}\"", m.addr()))
            .collect();
        names.join(", ")
    };
    format!(
        "[pools]\nprimaries = [{}]\nbackups = [{}]\n{extra}",
        list(primaries),
        list(backups)
    )
}

/// A directory of its own named `name`, the configuration `text` in it, and
/// memrelay reading it (with `extra` flags, and its listener from the
/// command line, which a reload applies again), once it watches signals.
fn start(name: &str, text: &str, extra: &[&str]) -> (TempDir, PathBuf, Memrelay) {
    let dir = TempDir::new(name);
    let file = dir.file(FILE, text);
    let mut args = vec!["--config", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    let relay = Memrelay::start(&args);
    // Logged once SIGHUP is handled (before that it would end the process).
    relay.wait_for_output("memrelay started", 1, DEADLINE);
    (dir, file, relay)
}

/// Writes the configuration file anew, sends SIGHUP, and waits until the
/// `nth` reload of this memrelay is done.
fn reload_to(relay: &Memrelay, dir: &TempDir, text: &str, nth: usize) {
    dir.file(FILE, text);
    relay.hangup();
    relay.wait_for_output(RELOADED, nth, DEADLINE);
}

fn set(c: &mut Client, key: &str, value: &str) -> Vec<u8> {
    let req = format!("set {key} 0 0 {}\r\n{value}\r\n", value.len());
    c.send_until(req.as_bytes(), |b| b.ends_with(b"\r\n")).bytes
}

fn get(c: &mut Client, key: &str) -> Vec<u8> {
    c.send_until(format!("get {key}\r\n").as_bytes(), complete_retrieval)
        .bytes
}

fn hit(key: &str, value: &str) -> Vec<u8> {
    format!("VALUE {key} 0 {}\r\n{value}\r\nEND\r\n", value.len()).into_bytes()
}

/// Client threads, each on one connection for its whole life, writing its
/// own keys and reading each back: every reply must be exactly the one a
/// lone memcached would give.
struct Load {
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(addr: &str, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|t| {
                let (addr, stop, ops, errors) =
                    (addr.to_string(), stop.clone(), ops.clone(), errors.clone());
                std::thread::spawn(move || client(t, &addr, &stop, &ops, &errors))
            })
            .collect();
        Load {
            stop,
            ops,
            errors,
            threads,
        }
    }

    /// Waits until the clients have done `n` more set+get pairs.
    fn wait_for_ops(&self, n: u64) {
        let target = self.ops.load(Ordering::Relaxed) + n;
        let done = wait_until(DEADLINE, || {
            self.ops.load(Ordering::Relaxed) >= target
                || self.threads.iter().all(|t| t.is_finished())
        });
        assert!(
            done && self.ops.load(Ordering::Relaxed) >= target,
            "the clients did not get {n} more operations done; errors: {:?}",
            self.errors.lock().unwrap()
        );
    }

    /// Stops the clients; returns what went wrong.
    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let errors = self.errors.lock().unwrap().clone();
        (self.ops.load(Ordering::Relaxed), errors)
    }
}

/// One request of a load client: what it is, its bytes, when its reply is
/// complete, and the reply it must get.
type Step<'a> = (&'a str, &'a [u8], fn(&[u8]) -> bool, Vec<u8>);

fn client(t: usize, addr: &str, stop: &AtomicBool, ops: &AtomicU64, errors: &Mutex<Vec<String>>) {
    let mut c = Client::connect(addr);
    let fail = |what: String| {
        let mut e = errors.lock().unwrap();
        if e.len() < 20 {
            e.push(what);
        }
    };
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("reload:{t}:{}", seq % 300);
        let value = format!("v{t}.{seq}");
        let set = format!("set {key} 0 0 {}\r\n{value}\r\n", value.len());
        let get = format!("get {key}\r\n");
        let steps: [Step<'_>; 2] = [
            (
                "set",
                set.as_bytes(),
                |b| b.ends_with(b"\r\n"),
                b"STORED\r\n".to_vec(),
            ),
            ("get", get.as_bytes(), complete_retrieval, hit(&key, &value)),
        ];
        for (what, req, done, want) in steps {
            let r = c.send_until(req, done);
            if r.end != End::Complete || r.bytes != want {
                fail(format!(
                    "client {t}: {what} {key} (value {value}): {:?} {}",
                    r.end,
                    escape(&r.bytes)
                ));
                if r.end != End::Complete {
                    // The connection dropped or hung: nothing more to learn.
                    return;
                }
            }
        }
        ops.fetch_add(1, Ordering::Relaxed);
        seq += 1;
    }
}

#[test]
fn sighup_adds_then_removes_a_server_under_load() {
    let (p1, p2, p3, b1) = (
        Memcached::start(),
        Memcached::start(),
        Memcached::start(),
        Memcached::start(),
    );
    // What p1 counts with nobody but this stats query connected.
    let p1_alone = stat_u64(&p1.addr(), "curr_connections");
    let (dir, _file, relay) = start(
        "reload-load",
        &config(&[&p1, &p2], &[&b1], ""),
        &["-t", "2"],
    );
    let load = Load::start(&relay.addr(), 4);
    load.wait_for_ops(300);

    // Add a primary: some keys move to it, and are served by it.
    reload_to(&relay, &dir, &config(&[&p1, &p2, &p3], &[&b1], ""), 1);
    load.wait_for_ops(1000);
    let served = wait_until(DEADLINE, || stat_u64(&p3.addr(), "get_hits") > 0);
    assert!(
        served,
        "no key was read from the added server; output:\n{}",
        relay.output()
    );

    // Remove one of the first primaries: its keys move to the others, and
    // memrelay lets go of it once its requests are answered.
    reload_to(&relay, &dir, &config(&[&p2, &p3], &[&b1], ""), 2);
    load.wait_for_ops(1000);
    let released = wait_until(DEADLINE, || {
        stat_u64(&p1.addr(), "curr_connections") == p1_alone
    });
    assert!(
        released,
        "memrelay still holds connections to the removed server ({} open, {p1_alone} alone)",
        stat_u64(&p1.addr(), "curr_connections")
    );
    load.wait_for_ops(100);

    let (ops, errors) = load.finish();
    assert!(errors.is_empty(), "{ops} operations, errors: {errors:#?}");
    let s = stats(&relay.addr());
    assert_eq!(s["reloads"], "2", "{s:?}");
    assert_eq!(s["servers"], "3", "{s:?}");
    assert_eq!(s["server:0:address"], p2.addr(), "{s:?}");
    assert_eq!(s["server:1:address"], p3.addr(), "{s:?}");
    assert_eq!(s["server:2:role"], "backup", "{s:?}");
    // p3 was flushed when added (it could have held old copies); p2 when
    // the keys it gave p3 came back to it (see docs/ha.md).
    assert_eq!(s["server:0:flushed"], "1", "{s:?}");
    assert_eq!(s["server:1:flushed"], "1", "{s:?}");
    let out = relay.output();
    assert!(out.contains("server added"), "{out}");
    assert!(out.contains("server removed"), "{out}");
}

#[test]
fn a_key_that_moves_away_and_back_is_never_served_stale() {
    let (p1, p2) = (Memcached::start(), Memcached::start());
    let (dir, _file, relay) = start("reload-stale", &config(&[&p1], &[], ""), &[]);
    let mut c = relay.client();
    let keys: Vec<String> = (0..100).map(|i| format!("moving:{i}")).collect();
    for k in &keys {
        assert_eq!(set(&mut c, k, "old"), b"STORED\r\n");
    }
    // Some keys move to p2 and are written there; p1 keeps its old copies.
    reload_to(&relay, &dir, &config(&[&p1, &p2], &[], ""), 1);
    for k in &keys {
        assert_eq!(set(&mut c, k, "new"), b"STORED\r\n");
    }
    let moved = stat_u64(&p2.addr(), "curr_items");
    assert!(moved > 0 && moved < 100, "{moved} keys moved to p2");
    // Back to p1: it must not serve the copies it kept.
    reload_to(&relay, &dir, &config(&[&p1], &[], ""), 2);
    for k in &keys {
        let r = get(&mut c, k);
        assert!(
            r == hit(k, "new") || r == b"END\r\n",
            "{k}: {}; output:\n{}",
            escape(&r),
            relay.output()
        );
    }
}

#[test]
fn servers_a_reload_could_not_flush_serve_again_once_they_answer() {
    // Two primaries lose keys to a third, then get them back while both
    // are down: neither can be flushed then, and each waits for its
    // flush. Each holds other keys than the other (one tier): neither
    // may wait on the other, or both stay down for good. Twice: the
    // second time soon after their probers flushed them, which must not
    // make them wait out the rest between flushes after overflows.
    let (p1, p2, p3, k) = (
        Memcached::start(),
        Memcached::start(),
        Memcached::start(),
        Memcached::start(),
    );
    let (dir, _file, relay) = start("reload-unflushed", &config(&[&p1, &p2], &[&k], ""), &[]);
    let (mut p1, mut p2) = (p1, p2);
    let state = |i: usize| {
        stats(&relay.addr())
            .get(&format!("server:{i}:state"))
            .cloned()
    };
    let is = |want: &str| state(0).as_deref() == Some(want) && state(1).as_deref() == Some(want);
    let mut c = relay.client();
    let mut i = 0;
    for round in 1..=2 {
        reload_to(
            &relay,
            &dir,
            &config(&[&p1, &p2, &p3], &[&k], ""),
            2 * round - 1,
        );
        p1.kill();
        p2.kill();
        // Requests find them gone (a prober only watches a server marked
        // down).
        assert!(wait_until(DEADLINE, || {
            i += 1;
            get(&mut c, &format!("k{i}"));
            is("down")
        }));
        reload_to(&relay, &dir, &config(&[&p1, &p2], &[&k], ""), 2 * round);
        assert_eq!(
            relay.output().matches("cannot flush it now").count(),
            2 * round
        );
        p1.restart();
        p2.restart();
        assert!(
            wait_until(DEADLINE, || is("up")),
            "round {round}: {:?}\n{}",
            stats(&relay.addr()),
            relay.output()
        );
        assert_eq!(stat_u64(&relay.addr(), "server:0:flushed"), round as u64);
        assert_eq!(stat_u64(&relay.addr(), "server:1:flushed"), round as u64);
    }
}

#[test]
fn an_invalid_configuration_is_refused_and_the_running_one_kept() {
    let (p1, p2) = (Memcached::start(), Memcached::start());
    let (dir, file, relay) = start("reload-invalid", &config(&[&p1], &[], ""), &[]);
    let mut c = relay.client();
    assert_eq!(set(&mut c, "kept", "1"), b"STORED\r\n");

    // Not host:port: refused, named, and nothing changes.
    dir.file(
        FILE,
        "[pools]\nprimaries = [\"127.0.0.1:1\", \"nothost\"]\n",
    );
    relay.hangup();
    relay.wait_for_output("reload failed", 1, DEADLINE);
    let out = relay.output();
    let line = out.lines().find(|l| l.contains("reload failed")).unwrap();
    assert!(line.contains("pools.primaries[1]"), "{line}");
    assert!(line.contains("not host:port"), "{line}");
    assert!(line.contains(file.to_str().unwrap()), "{line}");
    assert_eq!(get(&mut c, "kept"), hit("kept", "1"));
    assert_eq!(set(&mut c, "after", "2"), b"STORED\r\n");
    assert_eq!(stat_u64(&p1.addr(), "curr_items"), 2);

    // Valid again, with a setting that waits for a restart: the rest
    // applies, that one is named.
    let threads = "[process]\nthreads = 7\n";
    reload_to(&relay, &dir, &config(&[&p1, &p2], &[], threads), 1);
    let out = relay.output();
    let line = out
        .lines()
        .find(|l| l.contains("restart to apply"))
        .unwrap();
    assert!(line.contains("process.threads"), "{line}");
    let s = stats(&relay.addr());
    assert_eq!(s["reloads"], "1", "{s:?}");
    assert_eq!(s["reload_failures"], "1", "{s:?}");
    assert_eq!(s["servers"], "2", "{s:?}");
    assert_ne!(s["threads"], "7", "{s:?}");
    assert_eq!(out.matches("reload failed").count(), 1, "{out}");
}

#[test]
fn the_admin_command_reloads_and_says_why_not() {
    let (p1, p2) = (Memcached::start(), Memcached::start());
    let (dir, _file, relay) = start("reload-admin", &config(&[&p1], &[], ""), &[]);
    let mut c = relay.client();
    let reload = |c: &mut Client| {
        let r = c.send_until(b"memrelay reload\r\n", |b| b.ends_with(b"\r\n"));
        assert_eq!(r.end, End::Complete, "{}", escape(&r.bytes));
        String::from_utf8(r.bytes).unwrap()
    };

    assert_eq!(reload(&mut c), "OK\r\n");
    dir.file(FILE, &config(&[&p1, &p2], &[], ""));
    assert_eq!(reload(&mut c), "OK\r\n");
    // Answered once the new configuration runs: stats show it already.
    assert_eq!(stats(&relay.addr())["servers"], "2");

    dir.file(FILE, "[timeouts]\nrequest = \"soon\"\n");
    let answer = reload(&mut c);
    // The client learns that it failed; the reason, which names files
    // and hosts, goes to the log only.
    assert_eq!(
        answer,
        "SERVER_ERROR reload failed: the configuration was refused (see the log)\r\n"
    );
    relay.wait_for_output("timeouts.request", 1, DEADLINE);
    // The connection, and the configuration, carry on.
    assert_eq!(set(&mut c, "k", "v"), b"STORED\r\n");
    assert_eq!(get(&mut c, "k"), hit("k", "v"));
    assert_eq!(stats(&relay.addr())["servers"], "2");

    let r = c.send_until(b"memrelay reboot\r\n", |b| b.ends_with(b"\r\n"));
    assert!(
        r.bytes.starts_with(b"CLIENT_ERROR usage"),
        "{}",
        escape(&r.bytes)
    );
}

#[test]
fn a_shorter_timeout_takes_effect_at_the_reload() {
    let mut p1 = Memcached::start();
    let slow = "[timeouts]\nrequest = \"4s\"\n";
    let (dir, _file, relay) = start("reload-timeout", &config(&[&p1], &[], slow), &[]);
    let mut c = relay.client();
    assert_eq!(set(&mut c, "k", "v"), b"STORED\r\n");

    let fast = "[timeouts]\nrequest = \"200ms\"\n";
    reload_to(&relay, &dir, &config(&[&p1], &[], fast), 1);

    // A hung server now costs 200 ms, not 4 s, on the connection already
    // open to it.
    p1.stop();
    let started = Instant::now();
    let r = get(&mut c, "k");
    let took = started.elapsed();
    p1.cont();
    assert_eq!(r, b"END\r\n", "{}", escape(&r));
    assert!(took < Duration::from_millis(2000), "took {took:?}");
    assert!(took >= Duration::from_millis(150), "took {took:?}");
}

#[test]
fn authentication_is_not_turned_on_by_a_reload() {
    // Sessions decide at accept whether they must authenticate: a reload
    // that turned it on would leave every connected client in. So it
    // waits for a restart, and says so.
    let p1 = Memcached::start();
    let (dir, _file, relay) = start("reload-auth", &config(&[&p1], &[], ""), &[]);
    let mut c = relay.client();
    assert_eq!(set(&mut c, "open", "1"), b"STORED\r\n");
    let auth = dir.file("auth", "user:secret\n");
    std::fs::set_permissions(&auth, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let with_auth = format!("[process]\nauth_file = \"{}\"\n", auth.display());
    reload_to(&relay, &dir, &config(&[&p1], &[], &with_auth), 1);
    let out = relay.output();
    let line = out
        .lines()
        .find(|l| l.contains("restart to apply"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("authentication on or off"), "{line}");
    // Old and new clients alike: still no authentication.
    assert_eq!(get(&mut c, "open"), hit("open", "1"));
    assert_eq!(get(&mut relay.client(), "open"), hit("open", "1"));
}

#[test]
fn pipelined_reload_commands_share_reloads() {
    // Each `memrelay reload` used to queue a whole reload (files read,
    // names resolved, every worker paused) behind the others: a client
    // could keep the proxy reloading. Those waiting together share one.
    let p1 = Memcached::start();
    let (_dir, _file, relay) = start("reload-pipelined", &config(&[&p1], &[], ""), &[]);
    let mut c = relay.client();
    let n = 200;
    let r = c.send_until(&b"memrelay reload\r\n".repeat(n), |b| {
        b.windows(2).filter(|w| w == b"\r\n").count() >= n
    });
    assert_eq!(r.bytes, b"OK\r\n".repeat(n), "{}", escape(&r.bytes));
    let reloads: usize = stats(&relay.addr())["reloads"].parse().unwrap();
    assert!(
        (1..n / 2).contains(&reloads),
        "{reloads} reloads for {n} commands"
    );
}
