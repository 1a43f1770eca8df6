//! Server weights (`host:port:weight`) route keys exactly as twemproxy
//! does: a differential test against a live nutcracker (Debian's
//! twemproxy, installed by scripts/test) over the same real memcached
//! servers. Keys are stored through nutcracker, then read through memrelay
//! (no backups, so memrelay reads only the key's primary): every key is a
//! hit exactly when both pick the same server.
#![allow(clippy::panic, clippy::unwrap_used)]

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::{free_port, stats, wait_until, Client, Memcached, Memrelay, TempDir};

/// nutcracker, stopped when dropped.
struct Nutcracker(Child);

impl Drop for Nutcracker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nutcracker_bin() -> &'static str {
    for p in ["/usr/sbin/nutcracker", "/usr/bin/nutcracker"] {
        if std::path::Path::new(p).exists() {
            return p;
        }
    }
    panic!("nutcracker is not installed: scripts/test installs it (apt-get install nutcracker)");
}

fn nutcracker(
    dir: &TempDir,
    distribution: &str,
    servers: &[(String, u32)],
) -> (Nutcracker, String) {
    let lines: Vec<String> = servers.iter().map(|(a, w)| format!("{a}:{w}")).collect();
    nutcracker_with(dir, distribution, &lines)
}

/// nutcracker with these `servers:` entries, as written.
fn nutcracker_with(dir: &TempDir, distribution: &str, servers: &[String]) -> (Nutcracker, String) {
    let port = free_port("127.0.0.1");
    let stats = free_port("127.0.0.1");
    let mut conf = format!(
        "pool:\n  listen: 127.0.0.1:{port}\n  hash: md5\n  distribution: {distribution}\n  \
         auto_eject_hosts: false\n  servers:\n"
    );
    for line in servers {
        conf.push_str(&format!("    - {line}\n"));
    }
    let path = dir.file(&format!("{distribution}.yml"), &conf);
    // Owned by its guard from the start: a failed wait below must not
    // leave it running.
    let guard = Nutcracker(
        Command::new(nutcracker_bin())
            .arg("-c")
            .arg(&path)
            .args(["-a", "127.0.0.1", "-s", &stats.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = format!("127.0.0.1:{port}");
    assert!(
        wait_until(Duration::from_secs(10), || std::net::TcpStream::connect(
            &addr
        )
        .is_ok()),
        "nutcracker did not start"
    );
    (guard, addr)
}

/// How many of `keys` a get through `addr` misses.
fn misses(addr: &str, keys: &[String]) -> Vec<String> {
    let mut c = Client::connect(addr);
    keys.iter()
        .filter(|k| {
            !c.send_until(format!("get {k}\r\n").as_bytes(), |b| {
                b.ends_with(b"END\r\n")
            })
            .bytes
            .starts_with(b"VALUE")
        })
        .cloned()
        .collect()
}

/// Named servers (`host:port:weight name`): ketama hashes the names, as
/// twemproxy does, so a memrelay that reaches the same servers by other
/// addresses (here `localhost` for `127.0.0.1`) routes every key alike.
#[test]
fn named_servers_route_like_twemproxy_whatever_their_address() {
    let servers: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    let names = ["alpha", "beta", "gamma"];
    let lines: Vec<String> = servers
        .iter()
        .zip(names)
        .map(|(m, n)| format!("127.0.0.1:{}:1 {n}", m.port()))
        .collect();
    let dir = TempDir::new("weights-named");
    let (_twem, twem_addr) = nutcracker_with(&dir, "ketama", &lines);
    let mut t = Client::connect(&twem_addr);
    let keys: Vec<String> = (0..300).map(|i| format!("named:{i}")).collect();
    for k in &keys {
        let r = t.send_until(format!("set {k} 0 0 1\r\nx\r\n").as_bytes(), |b| {
            b.ends_with(b"\r\n")
        });
        assert_eq!(r.bytes, b"STORED\r\n", "set {k} through nutcracker");
    }
    let relay_args = |host: &str, named: bool| -> Vec<String> {
        servers
            .iter()
            .zip(names)
            .flat_map(|(m, n)| {
                let addr = format!("{host}:{}:1", m.port());
                [
                    "-s".to_string(),
                    if named { format!("{addr} {n}") } else { addr },
                ]
            })
            .collect()
    };
    for host in ["127.0.0.1", "localhost"] {
        let relay = Memrelay::start(&relay_args(host, true));
        let missed = misses(&relay.addr(), &keys);
        assert!(
            missed.is_empty(),
            "named servers at {host}: {} of {} keys routed elsewhere than by nutcracker, e.g. {:?}",
            missed.len(),
            keys.len(),
            &missed[..missed.len().min(5)]
        );
        assert_eq!(stats(&relay.addr())["server:1:name"], "beta");
    }
    // Without the names, ketama hashes the addresses: other points.
    let relay = Memrelay::start(&relay_args("localhost", false));
    assert!(
        misses(&relay.addr(), &keys).len() > keys.len() / 4,
        "the names made no difference"
    );
}

#[test]
fn two_servers_under_one_name_are_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_memrelay"))
        .args([
            "-s",
            "127.0.0.1:1:1 same",
            "-s",
            "127.0.0.1:2:1 same",
            "--check-config",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("both named 'same'"), "{err}");
}

fn same_routing(distribution: &str, hash: &str) {
    // twemproxy sorts its server list by name when it loads it (checking
    // for duplicates), so its modula order is the names' order, where
    // memrelay's (like magent's) is the configured order: list them sorted
    // so that both mean the same order.
    let mut servers: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    servers.sort_by_key(|m| m.addr());
    let weighted: Vec<(String, u32)> = servers
        .iter()
        .zip([1u32, 2, 5])
        .map(|(m, w)| (m.addr(), w))
        .collect();
    let dir = TempDir::new(&format!("weights-{distribution}"));
    let (_twem, twem_addr) = nutcracker(&dir, distribution, &weighted);
    let mut args: Vec<String> = vec!["--hash".into(), hash.into()];
    for (addr, w) in &weighted {
        args.push("-s".into());
        args.push(format!("{addr}:{w}"));
    }
    let relay = Memrelay::start(&args);
    let mut t = Client::connect(&twem_addr);
    let keys: Vec<String> = (0..400).map(|i| format!("weighted:{i}")).collect();
    for k in &keys {
        let r = t.send_until(format!("set {k} 0 0 1\r\nx\r\n").as_bytes(), |b| {
            b.ends_with(b"\r\n")
        });
        assert_eq!(r.bytes, b"STORED\r\n", "set {k} through nutcracker");
    }
    // Each server holds a share close to its weight (1:2:5 of 400).
    let held: Vec<usize> = servers
        .iter()
        .map(|m| {
            let mut c = Client::connect(&m.addr());
            keys.iter()
                .filter(|k| {
                    c.send_until(format!("get {k}\r\n").as_bytes(), |b| {
                        b.ends_with(b"END\r\n")
                    })
                    .bytes
                    .starts_with(b"VALUE")
                })
                .count()
        })
        .collect();
    assert_eq!(held.iter().sum::<usize>(), keys.len());
    assert!(
        held[0] < held[1] && held[1] < held[2],
        "{distribution}: keys per server {held:?} do not follow weights 1:2:5"
    );
    let mut m = Client::connect(&relay.addr());
    let misrouted: Vec<&String> = keys
        .iter()
        .filter(|k| {
            !m.send_until(format!("get {k}\r\n").as_bytes(), |b| {
                b.ends_with(b"END\r\n")
            })
            .bytes
            .starts_with(b"VALUE")
        })
        .collect();
    assert!(
        misrouted.is_empty(),
        "{distribution}: {} of {} keys routed elsewhere than by nutcracker, e.g. {:?} \
         (keys per server through nutcracker {held:?})",
        misrouted.len(),
        keys.len(),
        &misrouted[..misrouted.len().min(5)]
    );
}

#[test]
fn weighted_ketama_routes_like_twemproxy() {
    same_routing("ketama", "ketama");
}

#[test]
fn weighted_modula_routes_like_twemproxy() {
    same_routing("modula", "modula");
}

#[test]
fn weights_are_refused_with_magents_hash() {
    let out = Command::new(env!("CARGO_BIN_EXE_memrelay"))
        .args(["--hash", "magent", "-s", "127.0.0.1:1:2", "--check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("weights need --hash ketama or modula"),
        "{err}"
    );
}
