//! Idle clients are parked (a socket without a session task) and get a
//! session back at their next byte, knowing what they knew: one real
//! memcached behind memrelay.
#![allow(clippy::panic, clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::{escape, stat_u64, wait_until, Client, Memcached, Memrelay, TempFile};

/// The idle sweep runs every 2 s; a session idle for one to two sweeps is
/// parked.
const PARKED_WITHIN: Duration = Duration::from_secs(20);

fn parked(addr: &str) -> u64 {
    stat_u64(addr, "parked_connections")
}

/// `parked_connections`, asked after logging in (`--auth-file`).
fn parked_behind_login(addr: &str, login: &str) -> u64 {
    let mut c = Client::connect(addr);
    let r = c.send_until(format!("{login}stats\r\n").as_bytes(), |b| {
        b.ends_with(b"END\r\n")
    });
    let text = String::from_utf8_lossy(&r.bytes);
    text.lines()
        .find_map(|l| l.strip_prefix("STAT parked_connections "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no parked_connections in {text:?}"))
}

fn get(c: &mut Client, req: &str, reply_len: usize) -> Vec<u8> {
    c.send_until(req.as_bytes(), |b| b.len() >= reply_len).bytes
}

#[test]
fn an_idle_client_is_parked_and_served_again() {
    let m = Memcached::start();
    let relay = Memrelay::start(&["-s", &m.addr()]);
    let addr = relay.addr();
    let mut used = Client::connect(&addr);
    assert_eq!(get(&mut used, "set k 0 0 2\r\nv1\r\n", 8), b"STORED\r\n");
    // One that connects and never sends is parked too.
    let mut quiet = Client::connect(&addr);
    assert!(
        wait_until(PARKED_WITHIN, || parked(&addr) == 2),
        "parked: {}",
        parked(&addr)
    );
    // Theirs and the one asking (once the last one that asked is gone).
    assert!(
        wait_until(PARKED_WITHIN, || stat_u64(&addr, "curr_connections") == 3),
        "parked ones count: {}",
        stat_u64(&addr, "curr_connections")
    );
    let want = b"VALUE k 0 2\r\nv1\r\nEND\r\n";
    let r = get(&mut used, "get k\r\n", want.len());
    assert_eq!(r, want, "{}", escape(&r));
    let r = get(&mut quiet, "get k\r\n", want.len());
    assert_eq!(r, want, "{}", escape(&r));
    // Parked again once idle; a parked client that closes is counted out.
    assert!(wait_until(PARKED_WITHIN, || parked(&addr) == 2));
    drop(quiet);
    assert!(
        wait_until(PARKED_WITHIN, || {
            parked(&addr) == 1 && stat_u64(&addr, "curr_connections") == 2
        }),
        "a closed parked client is still counted"
    );
    let r = get(&mut used, "get k\r\n", want.len());
    assert_eq!(r, want, "{}", escape(&r));
}

#[test]
fn a_parked_client_stays_authenticated_and_one_that_is_not_is_not_parked() {
    let m = Memcached::start();
    let file = TempFile::new("auth", b"user:pass\n", 0o600);
    let relay = Memrelay::start(&["--auth-file", file.path(), "-s", &m.addr()]);
    let addr = relay.addr();
    let mut c = Client::connect(&addr);
    let login = "set auth 0 0 9\r\nuser pass\r\n";
    assert_eq!(get(&mut c, login, 8), b"STORED\r\n");
    let mut stranger = Client::connect(&addr);
    assert_eq!(
        get(&mut stranger, "get k\r\n", 30),
        b"CLIENT_ERROR unauthenticated\r\n"
    );
    assert!(wait_until(PARKED_WITHIN, || parked_behind_login(
        &addr, login
    ) == 1));
    // The stranger is held to --handshake-timeout by its session: never
    // parked. The parked client needs no second login.
    assert_eq!(get(&mut c, "set k 0 0 1\r\nv\r\n", 8), b"STORED\r\n");
    assert_eq!(
        get(&mut stranger, "get k\r\n", 30),
        b"CLIENT_ERROR unauthenticated\r\n"
    );
}

#[test]
fn parked_clients_are_closed_when_memrelay_drains() {
    let m = Memcached::start();
    let mut relay = Memrelay::start(&["-s", &m.addr(), "--shutdown-timeout", "30s"]);
    let addr = relay.addr();
    let mut c = Client::connect(&addr);
    assert_eq!(get(&mut c, "set k 0 0 1\r\nv\r\n", 8), b"STORED\r\n");
    assert!(wait_until(PARKED_WITHIN, || parked(&addr) == 1));
    let started = std::time::Instant::now();
    assert_eq!(relay.terminate(), Some(0), "{}", relay.output());
    // Quiet clients are closed at once; a parked one left behind would
    // hold the drain to its 30 s deadline.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the drain waited {:?} for a parked client",
        started.elapsed()
    );
    let r = c.send_until_close(b"");
    assert!(r.bytes.is_empty(), "{}", escape(&r.bytes));
}
