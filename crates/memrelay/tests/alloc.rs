//! The get-hit path allocates nothing per request: memrelay's `stats`
//! reports the process's allocation count (a counting global allocator), and
//! thousands of gets through one connection must not move it more than
//! buffer growth and background work (the prober asks every server for
//! `stats` once a second) can explain. One allocation per get would be at
//! least 10,000 here (each exchange is two gets); the bound is 250.
#![allow(clippy::panic, clippy::unwrap_used)]

mod support;

use support::{Client, Memcached, Memrelay};

fn allocations(c: &mut Client) -> u64 {
    let r = c.exchange(b"stats\r\n");
    let text = String::from_utf8_lossy(&r.bytes).to_string();
    text.lines()
        .find_map(|l| l.strip_prefix("STAT allocations ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no allocations stat in {text}"))
}

fn hit_path_allocations(args: &[String], requests: usize) -> (u64, usize) {
    let servers: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    let mut a = vec![
        "-t".to_string(),
        "1".to_string(),
        "-s".into(),
        servers[0].addr(),
        "-s".into(),
        servers[1].addr(),
    ];
    a.extend(args.iter().map(|s| s.replace("{b}", &servers[2].addr())));
    let relay = Memrelay::start(&a);
    let mut c = Client::with_sentinel(&relay.addr());
    let keys: Vec<String> = (0..50)
        .map(|i| format!("alloc-key-{i:02}-0123456789abcdef"))
        .collect();
    for k in &keys {
        let r = c.exchange(format!("set {k} 0 0 100\r\n{}\r\n", "v".repeat(100)).as_bytes());
        assert_eq!(r.bytes, b"STORED\r\n");
    }
    // Warm up: buffers reach their working size, connections exist.
    for i in 0..2000 {
        c.exchange(format!("get {}\r\n", keys[i % keys.len()]).as_bytes());
    }
    let before = allocations(&mut c);
    for i in 0..requests {
        let k = &keys[i % keys.len()];
        let r = c.exchange(format!("get {k}\r\n").as_bytes());
        assert!(
            r.bytes.starts_with(b"VALUE "),
            "expected a hit, got {:?}",
            String::from_utf8_lossy(&r.bytes)
        );
    }
    let after = allocations(&mut c);
    // The stats reply itself allocates (its text); count it out.
    let stats_cost = {
        let a = allocations(&mut c);
        allocations(&mut c) - a
    };
    (after - before - stats_cost, requests)
}

#[test]
fn get_hits_do_not_allocate_per_request() {
    let (allocs, requests) = hit_path_allocations(&[], 5000);
    println!("{allocs} allocations for {requests} get hits (each exchange also carries the sentinel get)");
    assert!(
        (allocs as usize) < requests / 20,
        "{allocs} allocations for {requests} get hits: the hit path allocates"
    );
}

#[test]
fn get_hits_with_a_backup_do_not_allocate_per_request() {
    let (allocs, requests) = hit_path_allocations(&["-b".to_string(), "{b}".to_string()], 5000);
    println!("{allocs} allocations for {requests} get hits with a backup configured");
    assert!(
        (allocs as usize) < requests / 20,
        "{allocs} allocations for {requests} get hits: the hit path allocates"
    );
}
