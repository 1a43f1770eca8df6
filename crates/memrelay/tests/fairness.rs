//! One client's heavy pipeline slows only itself (issue #17, 3). Alone in
//! its binary: it bounds a latency, so no other test may share the CPU.
#![allow(clippy::panic, clippy::unwrap_used)]

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::*;

/// Issue #17, 3: one client's deep pipeline of huge gets froze its worker
/// for seconds; another client's get on another server waited for it.
/// A session now yields after a bounded amount of work per turn.
#[test]
fn a_heavy_pipeline_slows_only_itself() {
    let (a, b) = (Memcached::start(), Memcached::start());
    // A client buffer large enough that without the per-turn bound one
    // turn would take in the whole pipeline (as with the 100,000-key
    // lines, which the default buffer does not stop).
    let proxy = Memrelay::start(&[
        "-t",
        "1",
        "-s",
        &a.addr(),
        "-s",
        &b.addr(),
        "--max-client-buffer",
        "268435456",
    ]);
    // A key on each server.
    let refs = [&a, &b];
    let keys = set_spread(&proxy.addr(), &refs, 20);
    let on = |server: &Memcached| -> String {
        let mut direct = server.client();
        keys.iter()
            .find(|k| {
                direct
                    .send_until(format!("get {k}\r\n").as_bytes(), complete_retrieval)
                    .bytes
                    .starts_with(b"VALUE")
            })
            .unwrap()
            .clone()
    };
    let (heavy_key, victim_key) = (on(&a), on(&b));
    let line = format!("get{}\r\n", format!(" {heavy_key}").repeat(500));
    let data = line.repeat(4000).into_bytes();
    let mut heavy = TcpStream::connect(proxy.addr()).unwrap();
    let writer = std::thread::spawn(move || {
        let _ = heavy.write_all(&data);
        heavy
    });
    let mut victim = Client::with_sentinel(&proxy.addr());
    let mut worst = Duration::ZERO;
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        let t = Instant::now();
        let r = victim.exchange(format!("get {victim_key}\r\n").as_bytes());
        assert!(r.bytes.starts_with(b"VALUE"), "{}", escape(&r.bytes));
        worst = worst.max(t.elapsed());
    }
    drop(writer.join());
    assert!(worst < Duration::from_millis(100), "worst {worst:?}");
}
