//! What a fleet costs a write: the same writes through a memrelay alone,
//! through one member of a three-member fleet (`--peer`), and through one
//! of a fleet with `--peer-confirm all`, side by side, rounds alternated;
//! first with every server up, then past a stopped primary.
//!
//! Each round starts a fresh primary and backup (real memcached on
//! loopback). In the failure rounds it kills the primary (so every write
//! is acknowledged by the backup alone and records its key as missed on
//! the primary, which in a fleet is a hint to both peers) and waits until
//! the memrelay has marked the primary down. Then it times `--writes`
//! sequential `set`s of distinct keys on one connection.
//!
//! ```text
//! cargo build --release -p memrelay --bin memrelay --example fleet_cost
//! target/release/examples/fleet_cost --rounds 3 --writes 5000
//! ```
//! (`MEMRELAY_BIN` picks the memrelay binary; by default the newest of
//! target/{release,debug}.)
#![allow(clippy::unwrap_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use memrelay_testkit::{free_port, stat_u64, stats, wait_until, Memcached, Memrelay, TempDir};

fn main() {
    let mut rounds = 3;
    let mut writes = 5000;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().and_then(|v| v.parse().ok()).unwrap();
        match a.as_str() {
            "--rounds" => rounds = value(),
            "--writes" => writes = value(),
            _ => panic!("usage: fleet_cost [--rounds N] [--writes N]"),
        }
    }
    for failed in [false, true] {
        let mut results: Vec<(Setup, Vec<Duration>)> =
            SETUPS.iter().map(|s| (*s, Vec::new())).collect();
        for round in 0..rounds {
            // Rotated each round: slow drift of the machine cancels out.
            for k in 0..SETUPS.len() {
                let i = (k + round) % SETUPS.len();
                let lat = run(results[i].0, failed, writes);
                println!(
                    "round {round} {:<22} p50 {:>6.1} us  p99 {:>6.1} us",
                    results[i].0.name,
                    micros(percentile(&lat, 0.5)),
                    micros(percentile(&lat, 0.99))
                );
                results[i].1.extend(lat);
            }
        }
        let what = if failed {
            "past a stopped primary"
        } else {
            "with every server up"
        };
        println!("\nall rounds, {writes} writes {what} per round:");
        println!("| memrelay | p50 | p99 | p99.9 | mean |");
        println!("|---|---|---|---|---|");
        for (setup, lat) in &results {
            let mean = lat.iter().sum::<Duration>() / lat.len().max(1) as u32;
            println!(
                "| {} | {:.1} us | {:.1} us | {:.1} us | {:.1} us |",
                setup.name,
                micros(percentile(lat, 0.5)),
                micros(percentile(lat, 0.99)),
                micros(percentile(lat, 0.999)),
                micros(mean)
            );
        }
        println!();
    }
}

/// A memrelay alone, or one member of a fleet of three.
#[derive(Debug, Clone, Copy)]
struct Setup {
    name: &'static str,
    fleet: bool,
    confirm: &'static str,
}

const SETUPS: [Setup; 3] = [
    Setup {
        name: "alone",
        fleet: false,
        confirm: "reached",
    },
    Setup {
        name: "fleet of 3",
        fleet: true,
        confirm: "reached",
    },
    Setup {
        name: "fleet of 3, confirm all",
        fleet: true,
        confirm: "all",
    },
];

/// One round: the latencies of `writes` sets (past a stopped primary if
/// `failed`).
fn run(setup: Setup, failed: bool, writes: usize) -> Vec<Duration> {
    let fleet = setup.fleet;
    let mut primary = Memcached::start();
    let backup = Memcached::start();
    let dir = TempDir::new("fleet-cost");
    let secret = dir.file("secret", "a fleet secret of more than 16 bytes\n");
    let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(&secret, private).unwrap();
    let ports = [0; 3].map(|_| free_port("127.0.0.1"));
    let relay = |i: usize| {
        let mut args = vec![
            "-s".to_string(),
            primary.addr(),
            "-b".into(),
            backup.addr(),
            "-t".into(),
            "1".into(),
        ];
        if fleet {
            args.extend([
                "--peer-listen".into(),
                format!("127.0.0.1:{}", ports[i]),
                "--peer-secret-file".into(),
                secret.display().to_string(),
                "--peer-confirm".into(),
                setup.confirm.into(),
            ]);
            for p in ports {
                args.extend(["--peer".into(), format!("127.0.0.1:{p}")]);
            }
        }
        Memrelay::start(&args)
    };
    let members: Vec<Memrelay> = (0..if fleet { 3 } else { 1 }).map(relay).collect();
    let a = &members[0];
    if fleet {
        assert!(wait_until(Duration::from_secs(5), || stat_u64(
            &a.addr(),
            "peers_up"
        ) == 2));
    }
    let mut conn = Conn::open(&a.addr());
    if failed {
        primary.kill();
        // Writes until the primary is marked down: from then on each
        // write goes to the backup alone at once.
        let mut n = 0;
        let down = wait_until(Duration::from_secs(10), || {
            n += 1;
            conn.set(&format!("warm:{n}"));
            stats(&a.addr()).get("server:0:state").map(String::as_str) == Some("down")
        });
        assert!(
            down,
            "the primary was never marked down: {:?}",
            stats(&a.addr())
                .into_iter()
                .filter(|(k, _)| k.starts_with("server:0"))
                .collect::<Vec<_>>()
        );
    }
    let mut lat = Vec::with_capacity(writes);
    for i in 0..writes {
        let t = Instant::now();
        conn.set(&format!("key:{i}"));
        lat.push(t.elapsed());
    }
    let taken = members
        .get(1)
        .map_or(0, |m| stat_u64(&m.addr(), "peer_hints_received"));
    if fleet && failed {
        assert!(
            taken >= writes as u64,
            "a peer took {taken} hints of {writes}"
        );
    } else {
        assert_eq!(taken, 0, "hints while every server was up");
    }
    lat.sort();
    lat
}

struct Conn {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Conn {
    fn open(addr: &str) -> Conn {
        let w = TcpStream::connect(addr).unwrap();
        w.set_nodelay(true).unwrap();
        w.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Conn {
            r: BufReader::new(w.try_clone().unwrap()),
            w,
        }
    }

    fn set(&mut self, key: &str) {
        write!(self.w, "set {key} 0 0 5\r\nvalue\r\n").unwrap();
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        assert_eq!(line, "STORED\r\n", "set {key}");
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let mut v = sorted.to_vec();
    v.sort();
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
