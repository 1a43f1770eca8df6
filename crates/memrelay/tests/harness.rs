//! Self-tests of the shared harness: the memcached guard's kill / restart /
//! SIGSTOP / SIGCONT (needed by the HA tests) and the client's handling of
//! closed connections and deadlines.
#![allow(clippy::panic, clippy::unwrap_used)]

mod support;

use std::net::TcpStream;
use std::time::{Duration, Instant};
use support::{complete_retrieval, Client, End, Memcached};

fn get(addr: &str, key: &str) -> Vec<u8> {
    let mut c = Client::connect(addr);
    c.send_until(format!("get {key}\r\n").as_bytes(), complete_retrieval)
        .bytes
}

#[test]
fn memcached_guard_starts_and_serves() {
    let m = Memcached::start();
    assert!(m.addr().starts_with("127.0.0.1:"));
    let mut c = Client::with_sentinel(&m.addr());
    assert_eq!(c.exchange(b"set k 0 0 1\r\nv\r\n").bytes, b"STORED\r\n");
    assert_eq!(get(&m.addr(), "k"), b"VALUE k 0 1\r\nv\r\nEND\r\n");
}

#[test]
fn kill_closes_the_port_and_restart_reuses_it() {
    let mut m = Memcached::start();
    let addr = m.addr();
    let mut c = Client::with_sentinel(&addr);
    assert_eq!(c.exchange(b"set k 0 0 1\r\nv\r\n").bytes, b"STORED\r\n");
    m.kill();
    assert!(!m.is_running());
    assert!(
        TcpStream::connect(&addr).is_err(),
        "port still open after kill"
    );
    // The old connection sees the close.
    let r = c.exchange(b"get k\r\n");
    assert_eq!(r.end, End::Closed);
    m.restart();
    assert_eq!(m.addr(), addr, "restart must keep the port");
    assert_eq!(
        get(&addr, "k"),
        b"END\r\n",
        "a restarted memcached is empty"
    );
}

#[test]
fn stop_freezes_and_cont_resumes() {
    let mut m = Memcached::start();
    let mut c = Client::with_sentinel(&m.addr());
    m.stop();
    c.set_deadline(Duration::from_millis(300));
    let r = c.exchange(b"set k 0 0 1\r\nv\r\n");
    assert_eq!(r.end, End::Timeout, "a stopped memcached answered: {r:?}");
    assert!(r.bytes.is_empty());
    m.cont();
    // The request sent while stopped is served after SIGCONT; its reply and
    // the sentinel's arrive now.
    c.set_deadline(Duration::from_secs(5));
    let r = c.read_until(|b| b.ends_with(b"END\r\n"));
    assert_eq!(r.end, End::Complete);
    assert!(r.bytes.starts_with(b"STORED\r\n"), "{r:?}");
    assert_eq!(get(&m.addr(), "k"), b"VALUE k 0 1\r\nv\r\nEND\r\n");
    // The connection is still usable after the timeout.
    assert_eq!(
        c.exchange(b"get k\r\n").bytes,
        b"VALUE k 0 1\r\nv\r\nEND\r\n"
    );
}

#[test]
fn drop_kills_a_stopped_server() {
    let mut m = Memcached::start();
    let addr = m.addr();
    m.stop();
    let t = Instant::now();
    drop(m);
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(
        TcpStream::connect(&addr).is_err(),
        "port still open after drop"
    );
}

#[test]
fn client_reports_close_with_partial_reply() {
    let m = Memcached::start();
    let mut c = Client::with_sentinel(&m.addr());
    let r = c.exchange(b"get nope\r\nquit\r\n");
    assert_eq!(
        r,
        support::Reply {
            bytes: b"END\r\n".to_vec(),
            end: End::Closed
        }
    );
}

#[test]
fn ipv6_memcached() {
    let m = Memcached::start_on("::1");
    assert!(m.addr().starts_with("[::1]:"));
    let mut c = Client::with_sentinel(&m.addr());
    assert_eq!(c.exchange(b"set k6 0 0 1\r\nv\r\n").bytes, b"STORED\r\n");
    assert_eq!(get(&m.addr(), "k6"), b"VALUE k6 0 1\r\nv\r\nEND\r\n");
}
