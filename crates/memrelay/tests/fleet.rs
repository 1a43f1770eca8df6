//! A fleet of three memrelays (`--peer`), as the seeds deploy them behind
//! one VIP, with *partial* partitions: each memrelay reaches the primary
//! through its own fault-injecting forwarder (a fake network link, the
//! only fake here), so one can lose the primary while the others still
//! reach it. Servers are named (`host:port:1 name`): the memrelays reach
//! the primary at different addresses and still route and hint alike.
//!
//! The promise checked: a value acknowledged through A while A cannot
//! reach the primary is never followed, through B or C, by the older value
//! the primary still holds; not after A dies either.
#![allow(clippy::panic, clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};

use support::{
    free_port, stat_u64, stats, wait_until, Client, Fault, Forwarder, Memcached, Memrelay, TempDir,
    CONVERGE,
};
use support::{get_text as get, hit_text as value, set_text as set, Stopped};

const SECRET: &str = "a fleet secret of more than 16 bytes\n";

/// memcached P (primary) and K (backup), a forwarder to P for A, and the
/// three memrelays: A through the forwarder, B and C directly. `peers`:
/// whether they form a fleet.
struct Fleet {
    primary: Memcached,
    backup: Memcached,
    /// A's, B's and C's links to the primary.
    links: [Forwarder; 3],
    a: Memrelay,
    b: Memrelay,
    c: Memrelay,
    peer_ports: [u16; 3],
    _dir: TempDir,
}

fn start(name: &str, peers: bool) -> Fleet {
    start_with(name, peers, &[])
}

/// `start`, each member also given `extra` arguments.
fn start_with(name: &str, peers: bool, extra: &[&str]) -> Fleet {
    // A peer port is picked free, then bound by memrelay: another test's
    // process can take it in between. Then that member never listens
    // (it says so), and the fleet is started again on other ports.
    for _ in 0..3 {
        let f = try_start(name, peers, extra);
        if !peers {
            return f;
        }
        let members = [&f.a, &f.b, &f.c];
        // A member that stops accepting fails below with every member's
        // output, rather than in a connect deep in `stat_u64`.
        let accepting = |r: &Memrelay| std::net::TcpStream::connect(r.addr()).is_ok();
        let converged = members.iter().all(|r| {
            wait_until(CONVERGE, || {
                accepting(r) && stat_u64(&r.addr(), "peers_up") == 2
            })
        });
        if converged {
            return f;
        }
        let port_taken = members
            .iter()
            .any(|r| r.output().contains("cannot listen for peers"));
        assert!(
            port_taken,
            "the peers never all reached each other: {:?}\n{}",
            members.map(|r| accepting(r).then(|| peers_of(r))),
            members.map(|r| r.output_tail(20)).join("\n---\n")
        );
    }
    panic!("three fleets in a row lost a peer port to another process");
}

fn try_start(name: &str, peers: bool, extra: &[&str]) -> Fleet {
    let primary = Memcached::start();
    let backup = Memcached::start();
    let links = [0; 3].map(|_| Forwarder::start(&primary.addr()));
    // One directory per test: tests run at once in one process.
    let dir = TempDir::new(name);
    let secret = dir.file("secret", SECRET);
    let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(&secret, private).unwrap();
    let peer_ports = [0; 3].map(|_| free_port("127.0.0.1"));
    let relay = |i: usize, primary_addr: &str| {
        let mut args: Vec<String> = vec![
            "-s".into(),
            format!("{primary_addr}:1 cache-p"),
            "-b".into(),
            format!("{}:1 cache-k", backup.addr()),
            "--timeout".into(),
            "300ms".into(),
            "--connect-timeout".into(),
            "300ms".into(),
            "-t".into(),
            "2".into(),
        ];
        if peers {
            args.push("--peer-listen".into());
            args.push(format!("127.0.0.1:{}", peer_ports[i]));
            args.push("--peer-secret-file".into());
            args.push(secret.display().to_string());
            for p in peer_ports {
                args.push("--peer".into());
                args.push(format!("127.0.0.1:{p}"));
            }
        }
        for a in extra {
            // Each member its own state file.
            args.push(
                a.replace("{member}", &i.to_string())
                    .replace("{dir}", &dir.path("").display().to_string()),
            );
        }
        Memrelay::start(&args)
    };
    let a = relay(0, &links[0].addr());
    let b = relay(1, &links[1].addr());
    let c = relay(2, &links[2].addr());
    Fleet {
        primary,
        backup,
        links,
        a,
        b,
        c,
        peer_ports,
        _dir: dir,
    }
}

/// Asserts that `key` reads `want` through each of `members`.
fn reads_everywhere(members: &[&Memrelay], key: &str, want: String) {
    for r in members {
        assert_eq!(get(&r.addr(), key), want, "through {}", r.addr());
    }
}

fn peers_of(r: &Memrelay) -> Vec<(String, String)> {
    let mut s: Vec<(String, String)> = stats(&r.addr())
        .into_iter()
        .filter(|(k, _)| k.starts_with("peer"))
        .collect();
    s.sort();
    s
}

/// Writes `key` = old through B (both servers have it), then cuts A from
/// the primary and writes `key` = new through A: A acknowledges it from
/// the backup alone.
fn write_past_the_primary(f: &Fleet, key: &str) {
    assert_eq!(set(&f.b.addr(), key, "old"), "STORED\r\n");
    assert_eq!(get(&f.a.addr(), key), value(key, "old"));
    f.links[0].set(Fault::Blackhole);
    assert_eq!(set(&f.a.addr(), key, "new"), "STORED\r\n");
    // The write went past the primary: it holds the old value, unless a
    // memrelay that reaches it was told and deleted it there already.
    let on_primary = get(&f.primary.addr(), key);
    assert!(
        on_primary == value(key, "old") || on_primary == "END\r\n",
        "{on_primary:?}"
    );
}

#[test]
fn without_a_fleet_a_partial_partition_serves_the_old_value() {
    // The failure the fleet exists for, shown so the test below is seen
    // to be able to fail: B knows nothing of what A wrote past the primary.
    let f = start("fleet-without", false);
    write_past_the_primary(&f, "k");
    assert_eq!(get(&f.primary.addr(), "k"), value("k", "old"));
    assert_eq!(get(&f.b.addr(), "k"), value("k", "old"));
}

#[test]
fn a_write_past_the_primary_through_one_memrelay_is_never_read_older_through_another() {
    let f = start("fleet-a_write_past_the_primary_through_one_mem", true);
    for key in ["k1", "k2"] {
        write_past_the_primary(&f, key);
        // Acknowledged: every peer was told before A answered.
        reads_everywhere(&[&f.b, &f.c], key, value(key, "new"));
    }
    assert!(stat_u64(&f.a.addr(), "peer_hints_sent") >= 2);
    assert_eq!(stat_u64(&f.a.addr(), "peer_hints_unacked"), 0);
    for r in [&f.b, &f.c] {
        assert!(
            stat_u64(&r.addr(), "peer_hints_received") >= 2,
            "{:?}",
            peers_of(r)
        );
    }
    // B and C reach the primary: they repair it, so the partition's old
    // value is gone from it before A is even back.
    let repaired = wait_until(CONVERGE, || {
        let v = get(&f.primary.addr(), "k1");
        v == value("k1", "new") || v == "END\r\n"
    });
    assert!(repaired, "the primary still serves the old value");
}

#[test]
fn a_member_that_saw_no_failure_deletes_a_peer_s_key_only_once_its_late_write_landed() {
    let f = start("fleet-late-write", true);
    assert_eq!(set(&f.b.addr(), "k", "v0"), "STORED\r\n");
    // A's link to the primary holds what it carries for 700 ms: A gives
    // up on its write after --timeout (300 ms), records the key, tells B
    // and C, and answers from the backup. The primary gets the write
    // later all the same. B's and C's links saw no failure.
    f.links[0].set(Fault::Delay(std::time::Duration::from_millis(700)));
    assert_eq!(set(&f.a.addr(), "k", "v1"), "STORED\r\n");
    f.links[0].set(Fault::Pass);
    // Told as held: a write given up on after it was sent.
    assert!(stat_u64(&f.a.addr(), "peer_hints_held_sent") >= 1);
    for r in [&f.b, &f.c] {
        assert!(stat_u64(&r.addr(), "peer_hints_held_received") >= 1);
    }
    // A newer value, acknowledged before A's write lands.
    assert_eq!(set(&f.b.addr(), "k", "v2"), "STORED\r\n");
    // A's write lands 700 ms after it was sent. Not asserted: on a slow
    // host the members may delete the key after it landed and before
    // this looks, which is right too. Either way it has landed once this
    // returns, and whatever B and C serve now is what they serve for good.
    let late = std::time::Duration::from_millis(2000);
    wait_until(late, || get(&f.primary.addr(), "k") == value("k", "v1"));
    // B and C learnt the key from A a moment ago: had either deleted it on
    // the primary already, it would now serve the older value there.
    reads_everywhere(&[&f.b, &f.c], "k", value("k", "v2"));
    // Deleted there once it can no longer be overwritten by A's write.
    let deleted = wait_until(CONVERGE, || get(&f.primary.addr(), "k") != value("k", "v1"));
    assert!(deleted, "the primary keeps the older value");
    reads_everywhere(&[&f.a, &f.b, &f.c], "k", value("k", "v2"));
}

#[test]
fn what_a_crashed_memrelay_knew_outlives_it() {
    let mut f = start("fleet-what_a_crashed_memrelay_knew_outlives_it", true);
    write_past_the_primary(&f, "k");
    // A dies with the knowledge; the partition heals.
    f.a.kill();
    f.links[0].set(Fault::Pass);
    reads_everywhere(&[&f.b, &f.c], "k", value("k", "new"));
}

#[test]
fn a_peer_reached_again_is_sent_every_key_the_servers_missed() {
    let mut f = start("fleet-a_peer_reached_again_is_sent_every_key_t", true);
    write_past_the_primary(&f, "k");
    // C restarts knowing nothing; A, still cut from the primary, still
    // lists the key, and sends it when C is reached again.
    let args = f.c.args().to_vec();
    f.c.kill();
    f.c = restart_on_a_new_port(args);
    let told = wait_until(CONVERGE, || {
        stat_u64(&f.c.addr(), "peer_hints_received") >= 1
    });
    assert!(told, "C was never sent the lists: {:?}", peers_of(&f.c));
    assert_eq!(get(&f.c.addr(), "k"), value("k", "new"));
}

#[test]
fn a_restarted_memrelay_learns_what_it_knew_from_its_peers_before_it_serves() {
    let mut f = start("fleet-a_restarted_memrelay_learns_what_it_knew", true);
    assert_eq!(set(&f.a.addr(), "k", "old"), "STORED\r\n");
    // No memrelay reaches the primary: all of them keep the key listed.
    // (Reset, not blackholed: a blackholed link would deliver A's write
    // once healed, as TCP does, and the primary would hold the new value.)
    for l in &f.links {
        l.set(Fault::Reset);
    }
    assert_eq!(set(&f.a.addr(), "k", "new"), "STORED\r\n");
    // A dies, without a state file, and comes back reaching the primary,
    // which still holds the old value.
    let args = f.a.args().to_vec();
    f.a.kill();
    f.links[0].set(Fault::Pass);
    assert_eq!(get(&f.primary.addr(), "k"), value("k", "old"));
    f.a = restart_on_a_new_port(args);
    // It asked its peers for their lists before it served.
    assert_eq!(get(&f.a.addr(), "k"), value("k", "new"));
    assert!(stat_u64(&f.a.addr(), "peer_hints_received") >= 1);
}

/// The same arguments (so the same peer port), on a new client port.
fn restart_on_a_new_port(args: Vec<String>) -> Memrelay {
    Memrelay::start_with(move |port| {
        let mut a = args.clone();
        if let Some(i) = a.iter().position(|x| x == "-p") {
            a[i + 1] = port.to_string();
        }
        a
    })
}

#[test]
fn a_restarted_member_gets_the_others_hints_from_its_first_request() {
    let mut f = start("fleet-restarted-member", true);
    assert_eq!(set(&f.b.addr(), "k", "old"), "STORED\r\n");
    // C stops; A notices that it is gone.
    let args = f.c.args().to_vec();
    f.c.kill();
    let noticed = wait_until(CONVERGE, || stat_u64(&f.a.addr(), "peers_up") == 1);
    assert!(noticed, "{:?}", peers_of(&f.a));
    // C comes back: it serves only once A and B have connected back to it.
    f.c = restart_on_a_new_port(args);
    // (Its port takes connections at once; it answers once it serves.)
    assert_eq!(stat_u64(&f.c.addr(), "peers_up"), 2, "{:?}", peers_of(&f.c));
    assert_eq!(stat_u64(&f.a.addr(), "peers_up"), 2, "{:?}", peers_of(&f.a));
    // So a write A sends past the primary right away reaches C first.
    f.links[0].set(Fault::Reset);
    assert_eq!(set(&f.a.addr(), "k", "new"), "STORED\r\n");
    assert_eq!(get(&f.c.addr(), "k"), value("k", "new"));
}

#[test]
fn a_write_given_up_on_does_not_reach_the_server_when_the_link_heals() {
    let f = start("fleet-given-up", true);
    assert_eq!(set(&f.b.addr(), "k", "v0"), "STORED\r\n");
    // A's write to the primary is held by the silent link; A gives up on
    // it after --timeout and answers from the backup.
    f.links[0].set(Fault::Blackhole);
    assert_eq!(set(&f.a.addr(), "k", "v1"), "STORED\r\n");
    // B writes a newer value; the key's invalidation on the primary is
    // done once B's list for it is empty.
    assert_eq!(set(&f.b.addr(), "k", "v2"), "STORED\r\n");
    let invalidated = wait_until(CONVERGE, || {
        stat_u64(&f.b.addr(), "server:0:missed_keys") == 0
    });
    assert!(invalidated, "{:?}", stats(&f.b.addr()));
    assert_eq!(set(&f.b.addr(), "k", "v3"), "STORED\r\n");
    // The link heals: A reset the connection it gave up on, so the held
    // v1 is dropped, as a reset drops a socket's unsent bytes. (Closed
    // gracefully, the kernel would have delivered it now, over v3.)
    f.links[0].set(Fault::Pass);
    assert!(wait_until(CONVERGE, || f.links[0].holding() == 0));
    // (A, reaching the primary again, deletes the key it listed there:
    // a needless invalidation, which costs one miss.)
    let on_primary = get(&f.primary.addr(), "k");
    assert!(
        on_primary == value("k", "v3") || on_primary == "END\r\n",
        "{on_primary:?}"
    );
    assert_eq!(get(&f.b.addr(), "k"), value("k", "v3"));
}

#[test]
fn a_write_in_flight_when_its_member_dies_does_not_reach_the_server_when_the_link_heals() {
    // A waits long for the primary: it is killed before it gives up.
    let mut f = start_with("fleet-in-flight", true, &["--timeout", "10s"]);
    assert_eq!(set(&f.b.addr(), "k", "v0"), "STORED\r\n");
    f.links[0].set(Fault::Blackhole);
    let mut c = Client::connect(&f.a.addr());
    c.write_raw(b"set k 0 0 2\r\nv1\r\n");
    // A sends a write to both replicas at once: once the backup has it,
    // the primary's copy is in the silent link.
    let sent = wait_until(CONVERGE, || get(&f.backup.addr(), "k") == value("k", "v1"));
    assert!(sent, "{:?}", stats(&f.a.addr()));
    assert!(wait_until(CONVERGE, || f.links[0].held_bytes() > 0));
    f.a.kill();
    assert_eq!(set(&f.b.addr(), "k", "v2"), "STORED\r\n");
    // The link heals. A's connections close with a reset when its process
    // ends, so the held v1 is dropped, as a reset drops a socket's unsent
    // bytes. (Closed gracefully, the dead process's kernel would deliver
    // it now, over v2, and nobody lists the key.)
    f.links[0].set(Fault::Pass);
    assert!(wait_until(CONVERGE, || f.links[0].holding() == 0));
    assert_eq!(f.links[0].held_bytes(), 0);
    assert_eq!(get(&f.primary.addr(), "k"), value("k", "v2"));
}

#[test]
fn a_connection_that_does_not_know_the_secret_is_refused() {
    let f = start("fleet-a_connection_that_does_not_know_the_secr", true);
    let addr = format!("127.0.0.1:{}", f.peer_ports[1]);
    let mut c = Client::connect(&addr);
    let r = c.send_until(b"get k\r\n", |b| b.ends_with(b"\n"));
    assert_eq!(
        String::from_utf8_lossy(&r.bytes).to_string(),
        "error not a memrelay peer\n"
    );
    let mut c = Client::connect(&addr);
    let r = c.send_until(b"memrelay-peer 4 abcd ef01 127.0.0.1:9\n", |b| {
        b.ends_with(b"\n")
    });
    assert!(
        String::from_utf8_lossy(&r.bytes)
            .to_string()
            .starts_with("challenge "),
        "{}",
        String::from_utf8_lossy(&r.bytes).to_string()
    );
    let r = c.send_until(b"auth 00ff\n", |b| b.ends_with(b"\n"));
    assert_eq!(
        String::from_utf8_lossy(&r.bytes).to_string(),
        "error not a member of this fleet\n"
    );
    // A member of another release is told so.
    let mut c = Client::connect(&addr);
    let r = c.send_until(b"memrelay-peer 2 abcd ef01 127.0.0.1:9\n", |b| {
        b.ends_with(b"\n")
    });
    assert_eq!(
        String::from_utf8_lossy(&r.bytes).to_string(),
        "error unsupported version\n"
    );
    // The fleet is unharmed.
    assert_eq!(stat_u64(&f.b.addr(), "peers_up"), 2);
}

#[test]
fn a_write_waiting_for_a_stopped_peer_does_not_hold_the_other_clients_of_its_worker() {
    // One worker thread, and a peer that takes long to be given up on.
    let f = start_with("fleet-not-held", true, &["-t", "1", "--peer-timeout", "3s"]);
    assert_eq!(set(&f.b.addr(), "k", "old"), "STORED\r\n");
    assert_eq!(set(&f.a.addr(), "other", "v"), "STORED\r\n");
    let c = Stopped::new(&f.c);
    // Past the primary: A's reply waits until C answers its hint, or
    // --peer-timeout gives C up.
    f.links[0].set(Fault::Reset);
    let mut writer = std::net::TcpStream::connect(f.a.addr()).unwrap();
    writer.write_all(b"set k 0 0 3\r\nnew\r\n").unwrap();
    let waits = wait_until(CONVERGE, || stat_u64(&f.a.addr(), "peer_hints_sent") >= 1);
    assert!(waits, "{:?}", peers_of(&f.a));
    // Another client of the same worker is served meanwhile (a read
    // from the backup), ...
    assert_eq!(get(&f.a.addr(), "other"), value("other", "v"));
    // ... while the write's reply is still held.
    writer.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    let held =
        matches!(writer.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    assert!(held, "the write was answered before the peer was");
    // C resumes and takes the hint: the write is answered, and C knows.
    drop(c);
    writer.set_nonblocking(false).unwrap();
    writer.set_read_timeout(Some(CONVERGE)).unwrap();
    let n = writer.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STORED\r\n");
    assert_eq!(get(&f.c.addr(), "k"), value("k", "new"));
}

const UNCONFIRMED: &str = "SERVER_ERROR write not confirmed by the fleet\r\n";

#[test]
fn with_confirm_all_a_write_past_the_primary_that_a_member_was_not_told_is_refused() {
    let f = start_with("fleet-confirm-all", true, &["--peer-confirm", "all"]);
    assert_eq!(set(&f.b.addr(), "k", "old"), "STORED\r\n");
    let c = Stopped::new(&f.c);
    // A write every replica took makes no hint: it waits for no peer.
    assert_eq!(set(&f.a.addr(), "other", "v"), "STORED\r\n");
    // Past the primary, C cannot be told: the client must not take the
    // write as acknowledged (as the default would have: see below).
    f.links[0].set(Fault::Blackhole);
    assert_eq!(set(&f.a.addr(), "k", "new"), UNCONFIRMED);
    // Nor with `noreply`: nothing is said, and the connection goes on.
    let mut client = Client::connect(&f.a.addr());
    let r = client.send_until(b"set k 0 0 3 noreply\r\nnew\r\nmn\r\n", |b| {
        b.ends_with(b"MN\r\n")
    });
    assert_eq!(r.bytes, b"MN\r\n");
    // A meta write (quiet or not) is refused the same way.
    let r = client.send_until(b"ms k 3 q\r\nnew\r\nmn\r\n", |b| b.ends_with(b"MN\r\n"));
    assert_eq!(
        String::from_utf8_lossy(&r.bytes),
        format!("{UNCONFIRMED}MN\r\n")
    );
    // In a pipeline, only the write is refused; the reads around it are
    // answered.
    let r = client.send_until(b"get k\r\nset k 0 0 3\r\nnew\r\ngat 0 k\r\nmn\r\n", |b| {
        b.ends_with(b"MN\r\n")
    });
    let text = String::from_utf8_lossy(&r.bytes);
    assert!(
        text.ends_with(&format!("{UNCONFIRMED}VALUE k 0 3\r\nnew\r\nEND\r\nMN\r\n"))
            || text.ends_with(&format!("{UNCONFIRMED}VALUE k 0 3\r\nold\r\nEND\r\nMN\r\n")),
        "{text:?}"
    );
    assert!(stat_u64(&f.a.addr(), "peer_writes_refused") >= 2);
    assert!(stat_u64(&f.a.addr(), "peer_hints_unconfirmed") >= 2);
    // C comes back and is reached again: the same write is acknowledged,
    // and C serves it.
    drop(c);
    let reached = wait_until(CONVERGE, || stat_u64(&f.a.addr(), "peers_up") == 2);
    assert!(reached, "{:?}", peers_of(&f.a));
    assert_eq!(set(&f.a.addr(), "k", "newer"), "STORED\r\n");
    reads_everywhere(&[&f.b, &f.c], "k", value("k", "newer"));
}

#[test]
fn with_confirm_majority_one_member_of_three_may_be_missing_but_not_two() {
    let f = start_with(
        "fleet-confirm-majority",
        true,
        &["--peer-confirm", "majority"],
    );
    assert_eq!(set(&f.b.addr(), "k", "old"), "STORED\r\n");
    let c = Stopped::new(&f.c);
    f.links[0].set(Fault::Blackhole);
    // A and B are two of three.
    assert_eq!(set(&f.a.addr(), "k", "new"), "STORED\r\n");
    assert_eq!(get(&f.b.addr(), "k"), value("k", "new"));
    // A alone is not.
    let b = Stopped::new(&f.b);
    assert_eq!(set(&f.a.addr(), "k", "newer"), UNCONFIRMED);
    drop((b, c));
}

#[test]
fn by_default_a_write_is_acknowledged_though_a_member_was_not_told() {
    // What `--peer-confirm` is for: the default answers STORED, and the
    // member not told can serve the older value once it runs again,
    // until it is reached and sent the lists.
    let f = start("fleet-confirm-reached", true);
    assert_eq!(set(&f.b.addr(), "k", "old"), "STORED\r\n");
    let c = Stopped::new(&f.c);
    f.links[0].set(Fault::Blackhole);
    assert_eq!(set(&f.a.addr(), "k", "new"), "STORED\r\n");
    assert!(stat_u64(&f.a.addr(), "peer_hints_unconfirmed") == 0);
    drop(c);
}

/// The state files' argument for `start_with`: one per member.
const STATE_FILES: [&str; 2] = ["--state-file", "{dir}state{member}"];

#[test]
fn a_member_whose_hints_its_peers_took_learns_them_again_after_a_crash_instead_of_flushing() {
    let mut f = start_with("fleet-crash-shared", true, &STATE_FILES);
    assert_eq!(set(&f.b.addr(), "k", "old"), "STORED\r\n");
    assert_eq!(set(&f.b.addr(), "other", "kept"), "STORED\r\n");
    // A alone loses the primary: its write goes past it, and its peers
    // take the hint before A answers.
    f.links[0].set(Fault::Reset);
    assert_eq!(set(&f.a.addr(), "k", "new"), "STORED\r\n");
    // A's own record, which the peers took before A answered: its state
    // file says `learnt`, and never said `dirty` (a crash then would
    // have cost a flush).
    let args = f.a.args().to_vec();
    let state = state_file(&args);
    let text = std::fs::read_to_string(&state).unwrap();
    assert!(
        text.contains(" learnt\n") && !text.contains(" dirty"),
        "{text}"
    );
    // A crashes, and comes back reaching the primary.
    f.a.kill();
    f.links[0].set(Fault::Pass);
    f.a = restart_on_a_new_port(args);
    // It did not flush the primary: what it had listed, its peers gave
    // back (or had deleted there already).
    assert_eq!(get(&f.a.addr(), "k"), value("k", "new"));
    assert_eq!(get(&f.a.addr(), "other"), value("other", "kept"));
    assert_eq!(
        stat_u64(&f.a.addr(), "server:0:flushed"),
        0,
        "{}",
        f.a.output_tail(20)
    );
    assert_eq!(get(&f.primary.addr(), "other"), value("other", "kept"));
}

/// A fleet in which A wrote "k" past the primary (B had set "k" and
/// "other" before), then crashed: A's arguments, to reach C through the
/// returned link instead, which resets every connection until told
/// otherwise. Only the whole fleet can say again what A knew.
fn a_crashed_with_a_link_to_c(name: &str) -> (Fleet, Vec<String>, Forwarder) {
    let mut f = start_with(name, true, &STATE_FILES);
    assert_eq!(set(&f.b.addr(), "k", "old"), "STORED\r\n");
    assert_eq!(set(&f.b.addr(), "other", "kept"), "STORED\r\n");
    f.links[0].set(Fault::Reset);
    assert_eq!(set(&f.a.addr(), "k", "new"), "STORED\r\n");
    let mut args = f.a.args().to_vec();
    f.a.kill();
    f.links[0].set(Fault::Pass);
    let c = format!("127.0.0.1:{}", f.peer_ports[2]);
    let to_c = Forwarder::start(&c);
    to_c.set(Fault::Reset);
    for a in args.iter_mut().filter(|a| **a == c) {
        *a = to_c.addr();
    }
    (f, args, to_c)
}

#[test]
fn a_member_restarted_after_a_crash_dials_a_peer_again_instead_of_flushing() {
    // A comes back reaching C through a link that resets its first try.
    let (mut f, args, to_c) = a_crashed_with_a_link_to_c("fleet-crash-late-peer");
    let starting = std::thread::spawn(move || restart_on_a_new_port(args));
    let tried = wait_until(CONVERGE, || to_c.resets() >= 1);
    assert!(tried, "A never dialled C");
    to_c.set(Fault::Pass);
    f.a = starting.join().unwrap();
    // A dialled C again rather than flush the primary.
    assert!(
        f.a.output().contains("learnt again from the fleet"),
        "{}",
        f.a.output_tail(20)
    );
    assert_eq!(get(&f.a.addr(), "k"), value("k", "new"));
    assert_eq!(stat_u64(&f.a.addr(), "server:0:flushed"), 0);
    assert_eq!(get(&f.primary.addr(), "other"), value("other", "kept"));
}

#[test]
fn a_member_restarted_after_a_crash_holds_what_the_fleet_cannot_vouch_for_yet_instead_of_flushing()
{
    // A comes back while its link to C resets every try, past its start.
    let (mut f, args, to_c) = a_crashed_with_a_link_to_c("fleet-crash-held");
    f.a = restart_on_a_new_port(args);
    f.a.wait_for_output("could not say again yet", 1, CONVERGE);
    // Meanwhile A serves nothing from the primary: the backup answers.
    assert_eq!(get(&f.a.addr(), "k"), value("k", "new"));
    // C is reached: the fleet vouches, and the primary was not flushed.
    to_c.set(Fault::Pass);
    f.a.wait_for_output(
        "what this server missed was learnt again from the fleet",
        1,
        CONVERGE,
    );
    assert_eq!(get(&f.a.addr(), "k"), value("k", "new"));
    assert_eq!(get(&f.a.addr(), "other"), value("other", "kept"));
    assert_eq!(stat_u64(&f.a.addr(), "server:0:flushed"), 0);
    assert_eq!(get(&f.primary.addr(), "other"), value("other", "kept"));
}

/// The state file a member was started with.
fn state_file(args: &[String]) -> String {
    args[args.iter().position(|a| a == "--state-file").unwrap() + 1].clone()
}

#[test]
fn a_member_whose_hints_no_peer_took_flushes_after_a_crash() {
    let mut f = start_with("fleet-crash-untaken", true, &STATE_FILES);
    assert_eq!(set(&f.b.addr(), "k", "old"), "STORED\r\n");
    // A's peers are gone: its write past the primary is its alone.
    let peer_args = [f.b.args().to_vec(), f.c.args().to_vec()];
    f.b.kill();
    f.c.kill();
    let alone = wait_until(CONVERGE, || stat_u64(&f.a.addr(), "peers_up") == 0);
    assert!(alone, "{:?}", peers_of(&f.a));
    f.links[0].set(Fault::Reset);
    assert_eq!(set(&f.a.addr(), "k", "new"), "STORED\r\n");
    let args = f.a.args().to_vec();
    let text = std::fs::read_to_string(state_file(&args)).unwrap();
    assert!(
        text.contains(" dirty\n"),
        "marked before the answer: {text}"
    );
    // A crashes; its peers come back knowing nothing of the key, then A,
    // reaching the primary (which still holds the old value).
    f.a.kill();
    f.links[0].set(Fault::Pass);
    let [b, c] = peer_args;
    f.b = restart_on_a_new_port(b);
    f.c = restart_on_a_new_port(c);
    f.a = restart_on_a_new_port(args);
    // Every peer vouches, but none can say what A alone knew: A flushed
    // the primary before serving it.
    assert_eq!(get(&f.a.addr(), "k"), value("k", "new"));
    let flushed = wait_until(CONVERGE, || stat_u64(&f.a.addr(), "server:0:flushed") >= 1);
    assert!(flushed, "{}", f.a.output_tail(20));
}

#[test]
fn a_member_restarted_after_a_crash_asks_its_peers_again_instead_of_flushing() {
    let mut f = start_with("fleet-crash-learnt", true, &STATE_FILES);
    assert_eq!(set(&f.b.addr(), "k", "old"), "STORED\r\n");
    // Nobody reaches the primary: every member lists the key A wrote past
    // it; B and C only because A told them, and their state files say so.
    for l in &f.links {
        l.set(Fault::Reset);
    }
    assert_eq!(set(&f.a.addr(), "k", "new"), "STORED\r\n");
    // B crashes, and comes back reaching the primary, which still holds
    // the old value.
    let args = f.b.args().to_vec();
    f.b.kill();
    f.links[1].set(Fault::Pass);
    f.b = restart_on_a_new_port(args.clone());
    // It did not flush the primary (all it had listed, its peers still
    // list), and it knows the key again.
    assert_eq!(get(&f.b.addr(), "k"), value("k", "new"));
    assert_eq!(
        stat_u64(&f.b.addr(), "server:0:flushed"),
        0,
        "{:?}",
        stats(&f.b.addr())
    );
    assert!(
        f.b.output().contains("learnt again from the fleet"),
        "{}",
        f.b.output_tail(20)
    );
    // Once no peer can say it again (both are gone), the same restart
    // serves nothing from the primary while it waits for them (10 s),
    // then flushes it before B serves from it.
    f.a.kill();
    f.c.kill();
    f.b.kill();
    f.b = restart_on_a_new_port(args);
    assert_eq!(get(&f.b.addr(), "k"), value("k", "new"));
    let wait = std::time::Duration::from_secs(10) + CONVERGE;
    let flushed = wait_until(wait, || stat_u64(&f.b.addr(), "server:0:flushed") >= 1);
    assert!(flushed, "{}", f.b.output_tail(20));
    assert!(
        f.b.output()
            .contains("could not say again what this server missed"),
        "{}",
        f.b.output_tail(20)
    );
    assert_eq!(get(&f.b.addr(), "k"), value("k", "new"));
}

/// Starts the two members of a pair (`b`, then `a`) and waits until they
/// reached each other; returns them in that order.
fn start_pair(b: &[String], a: &[String]) -> (Memrelay, Memrelay) {
    let b = Memrelay::start(b);
    let a = Memrelay::start(a);
    for r in [&a, &b] {
        assert!(
            wait_until(CONVERGE, || stat_u64(&r.addr(), "peers_up") == 1),
            "the two members never reached each other: {}",
            r.output_tail(20)
        );
    }
    (b, a)
}

/// A member of a two-member fleet in front of memcached `server`,
/// listening for peers on `me`; with `handoff`, it hands off there.
fn pair_member(
    server: &str,
    secret: &std::path::Path,
    (me, peers): (u16, [u16; 2]),
    handoff: Option<&std::path::Path>,
) -> Vec<String> {
    let mut a: Vec<String> = vec!["-s".into(), server.into(), "--peer-listen".into()];
    a.push(format!("127.0.0.1:{me}"));
    a.push("--peer-secret-file".into());
    a.push(secret.display().to_string());
    for p in peers {
        a.push("--peer".into());
        a.push(format!("127.0.0.1:{p}"));
    }
    if let Some(h) = handoff {
        a.push("--handoff".into());
        a.push(h.display().to_string());
    }
    a
}

/// The fleet secret, written owner-only in `dir`.
fn secret_in(dir: &TempDir) -> std::path::PathBuf {
    let secret = dir.file("secret", SECRET);
    let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(&secret, private).unwrap();
    secret
}

/// A hand-off whose new process takes seconds to start (here a peer that
/// does not answer holds its join of the fleet) leaves the old process
/// accepting until the new one serves: a client that connects meanwhile
/// is answered at once, not left in a queue nobody accepts from. Then the
/// old one drains and the new one serves alone.
#[test]
fn while_the_new_process_of_a_hand_off_starts_the_old_one_goes_on_accepting() {
    let m = Memcached::start();
    let dir = TempDir::new("handoff-slow-start");
    let secret = secret_in(&dir);
    let (pa, pb) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let handoff = dir.path("handoff.sock");
    let member =
        |me: u16, h: Option<&std::path::Path>| pair_member(&m.addr(), &secret, (me, [pa, pb]), h);
    let (b, mut old) = start_pair(&member(pb, None), &member(pa, Some(&handoff)));
    let old_pid = stat_u64(&old.addr(), "pid");
    let stopped = Stopped::new(&b);
    // Returns once the new process holds the sockets; its join waits for
    // B, which says nothing while stopped.
    let new = Memrelay::cmd(&member(pa, Some(&handoff)))
        .port(old.port())
        .start();
    let asked = std::time::Instant::now();
    let answered_by = stat_u64(&old.addr(), "pid");
    assert_eq!(
        answered_by,
        old_pid,
        "a client that connected while the new process started waited {:?} for it \
         instead of being served by the old one",
        asked.elapsed()
    );
    assert_ne!(old_pid, u64::from(new.pid()));
    drop(stopped);
    assert!(
        old.wait_exit(std::time::Duration::from_secs(15)),
        "the old process never drained once the new one served: {}",
        old.output_tail(20)
    );
    assert!(
        old.output().contains("the new memrelay serves; draining"),
        "{}",
        old.output_tail(20)
    );
    assert_eq!(stat_u64(&new.addr(), "pid"), u64::from(new.pid()));
    assert_eq!(set(&new.addr(), "k", "v"), "STORED\r\n");
    assert_eq!(get(&new.addr(), "k"), value("k", "v"));
}

/// Members that reach each other through other addresses than the ones
/// they listen on (a NAT, a forwarder): after a hand-off, the peer dials
/// the new process back at once, as it does when the addresses are the
/// same, and the new process serves without waiting out its join.
#[test]
fn a_member_reached_through_a_forwarder_is_dialled_back_after_a_hand_off() {
    let m = Memcached::start();
    let dir = TempDir::new("handoff-forwarded");
    let secret = secret_in(&dir);
    let (pa, pb) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let fa = Forwarder::start(&format!("127.0.0.1:{pa}"));
    let fb = Forwarder::start(&format!("127.0.0.1:{pb}"));
    let port = |f: &Forwarder| f.addr().rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let handoff = dir.path("handoff.sock");
    let member = |me: u16, h: Option<&std::path::Path>| {
        pair_member(&m.addr(), &secret, (me, [port(&fa), port(&fb)]), h)
    };
    let (_b, mut old) = start_pair(&member(pb, None), &member(pa, Some(&handoff)));
    let new = Memrelay::cmd(&member(pa, Some(&handoff)))
        .port(old.port())
        .start();
    assert!(
        old.wait_exit(std::time::Duration::from_secs(15)),
        "the old process never drained: {}",
        old.output_tail(20)
    );
    assert!(
        !new.output()
            .contains("serving before every peer was reached"),
        "B did not dial the new process back: {}",
        new.output_tail(20)
    );
    assert!(wait_until(CONVERGE, || stat_u64(&new.addr(), "peers_up") == 1));
    assert_eq!(set(&new.addr(), "k", "v"), "STORED\r\n");
}

/// A member that reaches a peer again sends it every listed key, a round
/// trip per batch: over a slow link, with long lists, seconds. It does so
/// without holding the link, so the writes of its clients, whose hints
/// wait for every link (here: writes past a dead primary), are not held
/// that long; they skip the peer until it is reached.
#[test]
fn a_member_sending_its_lists_over_a_slow_link_does_not_hold_its_clients() {
    let mut primary = Memcached::start();
    let backup = Memcached::start();
    let dir = TempDir::new("fleet-slow-lists");
    let secret = secret_in(&dir);
    let (pa, pb) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    // A reaches B through a forwarder; B reaches A directly.
    let to_b = Forwarder::start(&format!("127.0.0.1:{pb}"));
    let to_b_port: u16 = to_b.addr().rsplit(':').next().unwrap().parse().unwrap();
    let member = |me: u16, peers: [u16; 2]| {
        let mut a = pair_member(
            &format!("{}:1 cache-p", primary.addr()),
            &secret,
            (me, peers),
            None,
        );
        a.extend(["-b".into(), format!("{}:1 cache-k", backup.addr())]);
        a
    };
    let (b, a) = start_pair(&member(pb, [pa, pb]), &member(pa, [pa, to_b_port]));
    // Every write through A now goes past the primary: 20,000 keys listed.
    primary.kill();
    const KEYS: usize = 20_000;
    let mut c = Client::connect(&a.addr());
    let mut burst = Vec::new();
    for i in 0..KEYS {
        burst.extend_from_slice(format!("set k{i} 0 0 1 noreply\r\nv\r\n").as_bytes());
    }
    burst.extend_from_slice(b"mn\r\n");
    let r = c.send_until(&burst, |b| b.ends_with(b"MN\r\n"));
    assert!(r.bytes.ends_with(b"MN\r\n"));
    let listed = || stat_u64(&a.addr(), "server:0:missed_keys") as usize;
    assert_eq!(listed(), KEYS);
    // The link to B is cut, then slow: 100 ms a round trip. A's keeper
    // reaches B again and sends its lists, 79 batches, about 8 s.
    to_b.set(Fault::Reset);
    assert!(wait_until(CONVERGE, || stat_u64(&a.addr(), "peers_up") == 0));
    to_b.set(Fault::Delay(std::time::Duration::from_millis(50)));
    // Meanwhile A's writes are answered in well under the sending's time:
    // at most --peer-timeout (200 ms) while B takes their hints, and less
    // while A sends the lists. One write held until the lists are sent
    // would take seconds.
    let mut slowest = std::time::Duration::ZERO;
    let mut n = 0;
    let until = std::time::Instant::now() + std::time::Duration::from_secs(4);
    while std::time::Instant::now() < until {
        let asked = std::time::Instant::now();
        assert_eq!(set(&a.addr(), &format!("w{n}"), "v"), "STORED\r\n");
        slowest = slowest.max(asked.elapsed());
        n += 1;
    }
    assert!(
        slowest < std::time::Duration::from_millis(1500),
        "a write through A waited {slowest:?} for its lists to be sent"
    );
    // B gets every key all the same, and the link is A's again.
    to_b.set(Fault::Pass);
    assert!(
        wait_until(std::time::Duration::from_secs(30), || {
            stat_u64(&a.addr(), "peers_up") == 1
                && stat_u64(&b.addr(), "server:0:missed_keys") as usize >= KEYS + n
        }),
        "{:?}\n{}",
        peers_of(&a),
        a.output_tail(20)
    );
}

/// While A hands off, its old process serves clients until the new one
/// does. B, seeing the new process, dials it; until the new one has taken
/// B's lists, B's hints must still reach the old one (which passes them
/// on), or a write through B past the primary is acknowledged while A's
/// old process still reads the primary's older value.
#[test]
fn a_member_keeps_telling_the_old_process_of_a_hand_off_until_the_new_one_is_reached() {
    let (primary, backup) = (Memcached::start(), Memcached::start());
    let dir = TempDir::new("handoff-hints-between");
    let secret = secret_in(&dir);
    let (pa, pb) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    // B reaches A through a slow link (120 ms a round trip): reaching A's
    // new process takes B most of a second, well within the 2 s the new
    // process waits for its peers before it serves (past them, a peer not
    // reached yet is the window docs/ha.md states). B reaches the primary
    // through a link the test cuts.
    let to_a = Forwarder::start(&format!("127.0.0.1:{pa}"));
    let to_a_port: u16 = to_a.addr().rsplit(':').next().unwrap().parse().unwrap();
    let b_primary = Forwarder::start(&primary.addr());
    let handoff = dir.path("handoff.sock");
    let member = |me: u16, peers: [u16; 2], p: &str, h: Option<&std::path::Path>| {
        let mut a = pair_member(&format!("{p}:1 cache-p"), &secret, (me, peers), h);
        a.extend(
            [
                "-b",
                &format!("{}:1 cache-k", backup.addr()),
                "--peer-timeout",
                "1s",
            ]
            .map(String::from),
        );
        a
    };
    let a_args = member(pa, [pa, pb], &primary.addr(), Some(&handoff));
    let (b, mut old) = start_pair(
        &member(pb, [to_a_port, pb], &b_primary.addr(), None),
        &a_args,
    );
    assert_eq!(set(&old.addr(), "k", "v0"), "STORED\r\n");
    to_a.set(Fault::Delay(std::time::Duration::from_millis(60)));
    b_primary.set(Fault::Reset);
    let new = Memrelay::cmd(&a_args).port(old.port()).start();
    // Until the new process serves (it waits for B to reach it), every
    // write through B goes past the primary, and A, old process or new,
    // must read it back.
    let old_pid = stat_u64(&old.addr(), "pid");
    let mut n = 0;
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < until {
        n += 1;
        let v = format!("v{n}");
        assert_eq!(set(&b.addr(), "k", &v), "STORED\r\n");
        let got = get(&old.addr(), "k");
        if got != value("k", &v) {
            panic!("write {n}: {got:?}, pid now {} (old {old_pid}, new {})\nOLD:\n{}\nNEW:\n{}\nB:\n{}", stat_u64(&old.addr(), "pid"), new.pid(), old.output_tail(15), new.output_tail(15), b.output_tail(15));
        }
        if stat_u64(&old.addr(), "pid") != old_pid {
            break;
        }
    }
    assert!(n > 1, "the new process served at once: nothing was checked");
    assert!(
        old.wait_exit(std::time::Duration::from_secs(15)),
        "the old process never drained: {}",
        old.output_tail(20)
    );
    assert_eq!(stat_u64(&new.addr(), "pid"), u64::from(new.pid()));
}

/// A memrelay that starts (not a hand-off) binds its port at once, so a
/// port in use fails the start, but accepts only once it serves: while a
/// peer that does not answer holds its start, a client is refused at once
/// (and retries, or tries another proxy) instead of waiting unanswered.
#[test]
fn a_starting_member_refuses_clients_until_it_serves_them() {
    let m = Memcached::start();
    let dir = TempDir::new("listen-when-ready");
    let secret = secret_in(&dir);
    let (pa, pb) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let b = Memrelay::start(&pair_member(&m.addr(), &secret, (pb, [pa, pb]), None));
    let _stopped = Stopped::new(&b);
    let port = free_port("127.0.0.1");
    let log = dir.path("a.log");
    let child = std::process::Command::new(support::memrelay_bin())
        .args(["-l", "127.0.0.1", "-p", &port.to_string()])
        .args(pair_member(&m.addr(), &secret, (pa, [pa, pb]), None))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let a = KillOnDrop(child);
    let started = wait_until(CONVERGE, || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("memrelay started"))
    });
    assert!(
        started,
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let addr = format!("127.0.0.1:{port}");
    let early = std::net::TcpStream::connect(&addr);
    assert_eq!(
        early.as_ref().map_err(std::io::Error::kind).err(),
        Some(std::io::ErrorKind::ConnectionRefused),
        "a client was let in before memrelay served: {early:?}"
    );
    assert!(
        wait_until(CONVERGE, || std::net::TcpStream::connect(&addr).is_ok()),
        "memrelay never served: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(stat_u64(&addr, "pid"), u64::from(a.0.id()));
}

/// A memrelay run by hand, killed when the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
