//! Reloading a fleet one member after another (`fleet::epoch`), against
//! real memcached processes: a primary is added, so some keys move to it,
//! while clients write and read those keys through members that have and
//! have not reloaded yet.
//!
//! The promise checked: no member serves a moved key older than what
//! another member acknowledged, whichever of them reloaded first; the
//! fleet switches to the new routing only once every member has it; a
//! member that cannot be reached holds the others on the old routing; and
//! one that started with the new file while it reached none of them joins
//! their reload once it does, instead of holding it.
#![allow(clippy::panic, clippy::unwrap_used)]

mod support;

use std::path::PathBuf;
use std::time::Duration;

use support::{
    free_port, stat_u64, stats, wait_until, Client, End, Fault, Forwarder, Memcached, Memrelay,
    TempDir, CONVERGE,
};
use support::{get_text as get, hit_text as value, set_text as set, Stopped};

const SECRET: &str = "a fleet secret of more than 16 bytes\n";
/// Longest wait for a fleet reload's step.
const DEADLINE: Duration = Duration::from_secs(15);

/// P0 the primary, P1 the primary a reload adds, K the backup, and three
/// members (A, B, C), each reading its own configuration file.
struct Fleet {
    p0: Memcached,
    p1: Memcached,
    k: Memcached,
    members: [Memrelay; 3],
    files: [PathBuf; 3],
    /// With `start_behind_links`: the addresses the members reach each
    /// other at (a forwarder to each member's peer port).
    peer_links: Vec<Forwarder>,
    /// Each member's arguments, as given (without its listener).
    args: [Vec<String>; 3],
    _dir: TempDir,
}

/// A configuration file: these primaries, the backup, magent's hash (so
/// the test can tell where a key goes: `moves`).
fn config(primaries: &[&Memcached], backup: &Memcached) -> String {
    let list: Vec<String> = primaries
        .iter()
        .map(|m| format!("\"{}\"", m.addr()))
        .collect();
    format!(
        "[pools]\nprimaries = [{}]\nbackups = [\"{}\"]\nhash = \"magent\"\n",
        list.join(", "),
        backup.addr()
    )
}

/// Whether `key` moves from P0 to P1 when P1 is added (magent's hash
/// modulo the number of primaries).
fn moves(key: &str) -> bool {
    memrelay::router::magent_hash(key.as_bytes()) % 2 == 1
}

fn start(name: &str) -> Fleet {
    start_with(name, false, false)
}

/// The members reach each other through forwarders, at other addresses
/// than they listen on (as behind a NAT): `--peer` names the forwarders,
/// the same list on every member, each member's own one included.
fn start_behind_links(name: &str) -> Fleet {
    start_with(name, true, false)
}

/// `handoff`: each member with a state file and a hand-off path, so that
/// a new process can take it over (`handoff`).
fn start_with(name: &str, behind_links: bool, handoff: bool) -> Fleet {
    // A peer port is picked free, then bound by memrelay: another test's
    // process can take it in between; then the fleet starts again.
    for _ in 0..3 {
        let f = try_start(name, behind_links, handoff);
        let converged = f
            .members
            .iter()
            .all(|r| wait_until(CONVERGE, || stat_u64(&r.addr(), "peers_up") == 2));
        if converged {
            return f;
        }
        assert!(
            f.members
                .iter()
                .any(|r| r.output().contains("cannot listen for peers")),
            "the peers never all reached each other:\n{}",
            f.members
                .each_ref()
                .map(|r| r.output_tail(20))
                .join("\n---\n")
        );
    }
    panic!("three fleets in a row lost a peer port to another process");
}

fn try_start(name: &str, behind_links: bool, handoff: bool) -> Fleet {
    let (p0, p1, k) = (Memcached::start(), Memcached::start(), Memcached::start());
    let dir = TempDir::new(name);
    let secret = dir.file("secret", SECRET);
    let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(&secret, private).unwrap();
    let peer_ports = [0; 3].map(|_| free_port("127.0.0.1"));
    let peer_links: Vec<Forwarder> = if behind_links {
        peer_ports
            .iter()
            .map(|p| Forwarder::start(&format!("127.0.0.1:{p}")))
            .collect()
    } else {
        Vec::new()
    };
    let peers: Vec<String> = if behind_links {
        peer_links.iter().map(Forwarder::addr).collect()
    } else {
        peer_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect()
    };
    let files = [0, 1, 2].map(|i| dir.file(&format!("m{i}.toml"), &config(&[&p0], &k)));
    let args = [0, 1, 2].map(|i| {
        let mut args: Vec<String> = vec![
            "--config".into(),
            files[i].display().to_string(),
            "--peer-listen".into(),
            format!("127.0.0.1:{}", peer_ports[i]),
            "--peer-secret-file".into(),
            secret.display().to_string(),
        ];
        for p in &peers {
            args.push("--peer".into());
            args.push(p.clone());
        }
        if handoff {
            for (flag, file) in [("--state-file", "state"), ("--handoff", "handoff.sock")] {
                args.push(flag.into());
                args.push(dir.path(&format!("{file}{i}")).display().to_string());
            }
            args.extend(["--shutdown-timeout".into(), "5s".into()]);
        }
        args
    });
    let members = args.clone().map(|args| {
        let r = Memrelay::start(&args);
        // SIGHUP is handled once this is logged.
        r.wait_for_output("memrelay started", 1, DEADLINE);
        r
    });
    Fleet {
        p0,
        p1,
        k,
        members,
        files,
        peer_links,
        args,
        _dir: dir,
    }
}

impl Fleet {
    fn addr(&self, i: usize) -> String {
        self.members[i].addr()
    }

    /// Member `i`'s file now names P0 and P1; it reloads (SIGHUP) and has
    /// read it (logged as a fleet reload's stage 1; a member reloading on
    /// its own logs `configuration reloaded`).
    fn reload(&self, i: usize) {
        self.reload_to(i, &[&self.p0, &self.p1]);
    }

    /// Member `i`'s file names P0 alone again; it reloads.
    fn reload_to_p0_only(&self, i: usize) {
        self.reload_to(i, &[&self.p0]);
    }

    fn reload_to(&self, i: usize, primaries: &[&Memcached]) {
        const READ: &str = "configuration re";
        std::fs::write(&self.files[i], config(primaries, &self.k)).unwrap();
        let before = self.members[i].output().matches(READ).count();
        self.members[i].hangup();
        self.members[i].wait_for_output(READ, before + 1, DEADLINE);
    }

    fn stage(&self, i: usize) -> u64 {
        stat_u64(&self.addr(i), "fleet_reload_stage")
    }

    /// Every member finished `n` fleet reloads.
    fn wait_done(&self, n: u64) {
        for i in 0..3 {
            assert!(
                wait_until(DEADLINE, || stat_u64(&self.addr(i), "fleet_reloads_done")
                    == n),
                "member {i} did not finish the fleet reload: {:?}\n{}",
                stats(&self.addr(i)),
                self.members[i].output_tail(20)
            );
            assert_eq!(self.stage(i), 0);
        }
        self.wait_deleted();
    }

    /// Waits until the keys the reload recorded as missed are deleted,
    /// once the servers have settled: until then writes of them skip the
    /// server that missed them (docs/ha.md), and the tests read P1
    /// directly after a write.
    fn wait_deleted(&self) {
        for i in 0..3 {
            let deleted = wait_until(DEADLINE, || {
                stats(&self.addr(i))
                    .iter()
                    .filter(|(k, _)| k.ends_with(":missed_keys"))
                    .all(|(_, v)| v == "0")
            });
            assert!(deleted, "member {i}: {:?}", stats(&self.addr(i)));
        }
    }
}

/// A key that the reload moves to P1, and one it leaves on P0.
fn keys() -> (String, String) {
    let moved = (0..)
        .map(|i| format!("moved-{i}"))
        .find(|k| moves(k))
        .unwrap();
    let stays = (0..)
        .map(|i| format!("stays-{i}"))
        .find(|k| !moves(k))
        .unwrap();
    (moved, stays)
}

#[test]
fn a_member_reloaded_first_serves_the_old_routing_until_every_member_has_the_new_one() {
    let f = start("fleet-reload-order");
    let (key, stays) = keys();
    f.reload(0);
    // Through A, then through B (not reloaded): were A serving the new
    // list, the first write would be on P1 alone and A would read it back
    // over B's newer one.
    assert_eq!(set(&f.addr(0), &key, "through-a"), "STORED\r\n");
    assert_eq!(set(&f.addr(1), &key, "through-b"), "STORED\r\n");
    assert_eq!(get(&f.addr(0), &key), value(&key, "through-b"));
    assert_eq!(get(&f.p1.addr(), &key), "END\r\n", "nothing went to P1 yet");
    // B and C still route by the old list: A waits for them.
    assert_eq!(f.stage(0), 1);
    assert_eq!(f.stage(1), 0);

    f.reload(1);
    f.reload(2);
    f.wait_done(1);
    // The new routing: the moved key's copy on P0 is left behind, and
    // every member reads the newest value (from the backup at first).
    for i in 0..3 {
        assert_eq!(
            get(&f.addr(i), &key),
            value(&key, "through-b"),
            "member {i}"
        );
    }
    assert_eq!(set(&f.addr(2), &key, "through-c"), "STORED\r\n");
    assert_eq!(get(&f.p1.addr(), &key), value(&key, "through-c"));
    assert_eq!(get(&f.p0.addr(), &key), value(&key, "through-b"));
    for i in 0..3 {
        assert_eq!(
            get(&f.addr(i), &key),
            value(&key, "through-c"),
            "member {i}"
        );
    }
    // A key that did not move is served as before throughout.
    assert_eq!(set(&f.addr(1), &stays, "s"), "STORED\r\n");
    assert_eq!(get(&f.p0.addr(), &stays), value(&stays, "s"));
}

#[test]
fn a_member_that_cannot_be_reached_holds_the_fleet_on_the_old_routing() {
    let f = start("fleet-reload-unreached");
    let (key, _) = keys();
    let stopped = Stopped::new(&f.members[2]);
    f.reload(0);
    f.reload(1);
    // A and B know each other reloaded, and still wait for C.
    for (me, peer) in [(0, 1), (1, 0)] {
        let peer_index = stats(&f.addr(me))
            .into_iter()
            .find(|(k, v)| k.ends_with(":address") && v.ends_with(&peer_port(&f, peer)))
            .map(|(k, _)| k.trim_end_matches(":address").to_string())
            .unwrap();
        assert!(
            wait_until(DEADLINE, || stat_u64(
                &f.addr(me),
                &format!("{peer_index}:reload_stage")
            ) == 1),
            "{:?}",
            stats(&f.addr(me))
        );
        assert_eq!(f.stage(me), 1);
    }
    // Meanwhile the moved key is written and read by the old routing.
    assert_eq!(set(&f.addr(0), &key, "v1"), "STORED\r\n");
    assert_eq!(get(&f.p0.addr(), &key), value(&key, "v1"));
    assert_eq!(get(&f.addr(1), &key), value(&key, "v1"));
    drop(stopped);
    f.reload(2);
    f.wait_done(1);
    assert_eq!(get(&f.addr(2), &key), value(&key, "v1"));
    assert_eq!(set(&f.addr(0), &key, "v2"), "STORED\r\n");
    assert_eq!(get(&f.p1.addr(), &key), value(&key, "v2"));
    assert_eq!(get(&f.addr(1), &key), value(&key, "v2"));
}

/// The port member `i` listens for peers on, as its peers' stats show it.
fn peer_port(f: &Fleet, i: usize) -> String {
    let args = f.members[i].args();
    let at = args.iter().position(|a| a == "--peer-listen").unwrap();
    args[at + 1].rsplit(':').next().unwrap().to_string()
}

/// The same arguments (so the same peer port), on a new client port.
fn restart_on_a_new_port(args: Vec<String>) -> Memrelay {
    let r = Memrelay::start_with(move |port| {
        let mut a = args.clone();
        if let Some(i) = a.iter().position(|x| x == "-p") {
            a[i + 1] = port.to_string();
        }
        a
    });
    r.wait_for_output("memrelay started", 1, DEADLINE);
    r
}

#[test]
fn a_member_restarted_during_a_fleet_reload_joins_it() {
    restart_mid_reload("fleet-reload-restart-mid", false);
}

#[test]
fn a_member_restarted_while_its_peers_do_not_answer_joins_their_reload_once_they_do() {
    restart_mid_reload("fleet-reload-restart-unanswered", true);
}

/// C dies; A and B reload and wait for it; C comes back with the new file
/// and joins. `unanswered`: A and B are stopped while C starts, so it
/// reaches neither (as when they answer too slowly) and serves by its
/// file until they answer.
fn restart_mid_reload(name: &str, unanswered: bool) {
    let mut f = start(name);
    let (key, _) = keys();
    assert_eq!(set(&f.addr(1), &key, "v0"), "STORED\r\n");
    let args = f.members[2].args().to_vec();
    f.members[2].kill();
    f.reload(0);
    f.reload(1);
    assert_eq!(set(&f.addr(0), &key, "v1"), "STORED\r\n");
    // C comes back with the new file: it learns the fleet's stage and the
    // old routing from its peers, and joins the reload there.
    std::fs::write(&f.files[2], config(&[&f.p0, &f.p1], &f.k)).unwrap();
    let stopped = unanswered.then(|| (Stopped::new(&f.members[0]), Stopped::new(&f.members[1])));
    f.members[2] = restart_on_a_new_port(args);
    let joined = if let Some(stopped) = stopped {
        assert_eq!(stat_u64(&f.addr(2), "peers_up"), 0);
        assert_eq!(f.stage(2), 0);
        drop(stopped);
        "joined the fleet's reload once its peers were reached"
    } else {
        // At start, or once it reaches them if they answered too slowly.
        "joined the fleet's reload"
    };
    f.members[2].wait_for_output(joined, 1, DEADLINE);
    f.wait_done(1);
    assert_eq!(get(&f.addr(2), &key), value(&key, "v1"));
    assert_eq!(set(&f.addr(2), &key, "v2"), "STORED\r\n");
    assert_eq!(get(&f.p1.addr(), &key), value(&key, "v2"));
    assert_eq!(get(&f.addr(0), &key), value(&key, "v2"));
}

/// The address member `i` listens for peers on.
fn peer_listen(f: &Fleet, i: usize) -> String {
    let at = f.args[i].iter().position(|a| a == "--peer-listen").unwrap();
    f.args[i][at + 1].clone()
}

#[test]
fn a_member_started_cut_from_its_peers_during_a_reload_to_its_file_joins_it_once_reached() {
    let mut f = start_behind_links("fleet-reload-late-join");
    let (key, _) = keys();
    // C dies; A and B reload and wait for it.
    let args = f.members[2].args().to_vec();
    f.members[2].kill();
    f.reload(0);
    f.reload(1);
    assert_eq!(set(&f.addr(0), &key, "v1"), "STORED\r\n");
    // C comes back with the new file, cut from A and B both ways: they
    // dial it through its forwarder, it dials them through forwarders of
    // its own.
    f.peer_links[2].set(Fault::Reset);
    let cut: Vec<Forwarder> = (0..2)
        .map(|i| Forwarder::start(&peer_listen(&f, i)))
        .collect();
    for l in &cut {
        l.set(Fault::Reset);
    }
    let mut args = args;
    for (shared, own) in f.peer_links.iter().zip(&cut) {
        let at = args.iter().position(|a| *a == shared.addr()).unwrap();
        args[at] = own.addr();
    }
    std::fs::write(&f.files[2], config(&[&f.p0, &f.p1], &f.k)).unwrap();
    f.members[2] = restart_on_a_new_port(args);
    // It reached nobody, so it serves by its own file; A and B wait.
    assert_eq!(stat_u64(&f.addr(2), "peers_up"), 0);
    assert_eq!(f.stage(2), 0);
    assert_eq!((f.stage(0), f.stage(1)), (1, 1));
    // Once the links heal, it hears that A and B wait for it in a reload
    // to the routing it serves: it joins, and the fleet finishes.
    for l in cut.iter().chain([&f.peer_links[2]]) {
        l.set(Fault::Pass);
    }
    f.wait_done(1);
    assert!(f.members[2]
        .output()
        .contains("joined the fleet's reload once its peers were reached"));
    assert_eq!(get(&f.addr(2), &key), value(&key, "v1"));
    assert_eq!(set(&f.addr(2), &key, "v2"), "STORED\r\n");
    assert_eq!(get(&f.p1.addr(), &key), value(&key, "v2"));
    assert_eq!(get(&f.addr(0), &key), value(&key, "v2"));
}

#[test]
fn a_member_restarted_with_a_new_file_starts_a_fleet_reload_the_others_finish() {
    let mut f = start("fleet-reload-restart-new-file");
    let (key, _) = keys();
    // A restarts with the new list while B and C run the old one: it
    // serves the old routing, as they do.
    let args = f.members[0].args().to_vec();
    f.members[0].kill();
    std::fs::write(&f.files[0], config(&[&f.p0, &f.p1], &f.k)).unwrap();
    f.members[0] = restart_on_a_new_port(args);
    assert_eq!(set(&f.addr(0), &key, "through-a"), "STORED\r\n");
    assert_eq!(set(&f.addr(1), &key, "through-b"), "STORED\r\n");
    assert_eq!(get(&f.addr(0), &key), value(&key, "through-b"));
    assert_eq!(get(&f.p1.addr(), &key), "END\r\n");
    assert_eq!(f.stage(0), 1, "{}", f.members[0].output_tail(20));
    // The others reload to it; the fleet switches.
    f.reload(1);
    f.reload(2);
    for i in 0..3 {
        assert!(
            wait_until(DEADLINE, || stat_u64(&f.addr(i), "fleet_reloads_done") == 1),
            "member {i}: {}",
            f.members[i].output_tail(20)
        );
        assert!(wait_until(DEADLINE, || f.stage(i) == 0));
    }
    f.wait_deleted();
    assert_eq!(get(&f.addr(2), &key), value(&key, "through-b"));
    assert_eq!(set(&f.addr(0), &key, "v2"), "STORED\r\n");
    assert_eq!(get(&f.p1.addr(), &key), value(&key, "v2"));
}

#[test]
fn members_that_reach_each_other_at_other_addresses_reload_in_step() {
    // Each member's own entry in the list is a forwarder back to itself:
    // it finds out, and does not wait for itself.
    let f = start_behind_links("fleet-reload-behind-links");
    let (key, _) = keys();
    f.reload(0);
    assert_eq!(set(&f.addr(0), &key, "through-a"), "STORED\r\n");
    assert_eq!(set(&f.addr(1), &key, "through-b"), "STORED\r\n");
    assert_eq!(get(&f.addr(0), &key), value(&key, "through-b"));
    f.reload(1);
    f.reload(2);
    f.wait_done(1);
    assert_eq!(get(&f.addr(2), &key), value(&key, "through-b"));
    assert_eq!(set(&f.addr(0), &key, "v2"), "STORED\r\n");
    assert_eq!(get(&f.p1.addr(), &key), value(&key, "v2"));
    // Back to P0 alone while A and B cannot reach C (C still reaches
    // them): C hears that they have the new list, they hear that C has
    // it, so they switch; C never hears that they did, so it does not
    // switch, and they cannot finish.
    f.peer_links[2].set(Fault::Reset);
    for i in 0..3 {
        f.reload_to_p0_only(i);
    }
    for i in 0..2 {
        assert!(wait_until(DEADLINE, || f.stage(i) == 2), "member {i}");
    }
    assert_eq!(f.stage(2), 1);
    // Switched members write by the new list and read each other's
    // writes; what C writes by the old list reaches them too (C still
    // reaches them). C is not read here: A cannot tell it what A's
    // writes went past, the window docs/ha.md names for a member cut
    // from a peer (by default; `--peer-confirm all` refuses such writes).
    assert_eq!(set(&f.addr(0), &key, "v3"), "STORED\r\n");
    assert_eq!(get(&f.addr(1), &key), value(&key, "v3"));
    assert_eq!(set(&f.addr(2), &key, "v4"), "STORED\r\n");
    assert_eq!(get(&f.addr(1), &key), value(&key, "v4"));
    assert_eq!(f.stage(2), 1);
    f.peer_links[2].set(Fault::Pass);
    f.wait_done(2);
    assert_eq!(get(&f.addr(2), &key), value(&key, "v4"));
}

#[test]
fn a_member_handed_off_during_a_fleet_reload_holds_the_fleet_until_its_old_process_is_gone() {
    let mut f = start_with("fleet-reload-handoff", false, true);
    let (key, _) = keys();
    f.reload(0);
    f.reload(1);
    // C's old process keeps a busy client while it drains (up to a
    // second): it serves the old list, with no reload, until it is gone.
    let (connected, on_old) = std::sync::mpsc::channel();
    let busy = {
        let addr = f.addr(2);
        std::thread::spawn(move || {
            let mut c = Client::connect(&addr);
            let mut first = Some(connected);
            while c
                .send_until(b"get busy\r\n", |b| b.ends_with(b"END\r\n"))
                .end
                == End::Complete
            {
                if let Some(tx) = first.take() {
                    let _ = tx.send(());
                }
            }
        })
    };
    // Its connection is to the old process before the new one starts.
    on_old.recv_timeout(DEADLINE).unwrap();
    let new = Memrelay::cmd(&f.args[2]).port(f.members[2].port()).start();
    let mut old = std::mem::replace(&mut f.members[2], new);
    // The new process joins the reload A and B are in; were it to tell
    // them so, they would switch while the old one serves the old list.
    f.members[2].wait_for_output("joined the fleet's reload at its stage", 1, DEADLINE);
    assert_eq!(set(&f.addr(0), &key, "v1"), "STORED\r\n");
    let gone = wait_until(DEADLINE, || {
        // A's stage first: if the old process still runs after, it ran then.
        let switched = f.stage(0) == 2;
        let running = old.exited().is_none();
        assert!(
            !(switched && running),
            "A switched while C's old process still served the old list:\nA:\n{}\nnew C:\n{}",
            f.members[0].output_tail(15),
            f.members[2].output_tail(15)
        );
        !running
    });
    assert!(gone, "C's old process never drained");
    busy.join().unwrap();
    // Once it is gone, the fleet goes on (C's file still has the old
    // list: it follows the fleet, and says it should be reloaded).
    f.wait_done(1);
    assert_eq!(get(&f.addr(2), &key), value(&key, "v1"));
}
