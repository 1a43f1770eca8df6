//! Routing micro-benchmarks: `Router::primary` (one hash and one ring
//! lookup, the hot path of every request) and `Router::replicas` (the same
//! hash, looked up in the primary tier and the backup tier).
//!
//! Run: `cargo bench -p memrelay --bench ring`
//! (quick: `-- --warm-up-time 1 --measurement-time 3`).
//!
//! Rings: ketama over 2, 10 and 100 servers, modula and magent over 10 (their
//! cost does not depend on the server count). `replicas` uses as many backups
//! as primaries. Keys of 10 and 250 bytes (memcached's maximum); each
//! iteration routes the same 1,024 distinct keys, built before the timed
//! loop, so the figures are not those of one key kept hot in the branch
//! predictor. Throughput: elements (keys routed) per second.

use std::net::SocketAddr;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use memrelay::config::{Config, HashKind, ServerAddr};
use memrelay::router::Router;

const KEYS: usize = 1024;

fn server(i: usize) -> ServerAddr {
    let name = format!("10.0.{}.{}:11211", i / 250, i % 250 + 1);
    let (host, _) = name.rsplit_once(':').unwrap_or((&name, ""));
    ServerAddr {
        host: host.to_string(),
        name,
        port: 11211,
        // Routing only looks at names; nothing here connects.
        addr: SocketAddr::from(([127, 0, 0, 1], 11211)),
        weight: 1,
        label: None,
    }
}

fn router(kind: HashKind, primaries: usize, backups: usize) -> Router {
    let cfg = Config {
        primaries: (0..primaries).map(server).collect(),
        backups: (primaries..primaries + backups).map(server).collect(),
        hash: kind,
        ..Config::default()
    };
    Router::new(&cfg)
}

/// `KEYS` distinct keys of exactly `len` bytes.
fn keys(len: usize) -> Vec<Vec<u8>> {
    (0..KEYS)
        .map(|i| {
            let mut k = format!("user:{i}:").into_bytes();
            k.resize(len, b'x');
            k
        })
        .collect()
}

fn bench_ring(c: &mut Criterion) {
    let rings: [(&str, HashKind, usize); 5] = [
        ("ketama", HashKind::Ketama, 2),
        ("ketama", HashKind::Ketama, 10),
        ("ketama", HashKind::Ketama, 100),
        ("modula", HashKind::Modula, 10),
        ("magent", HashKind::Magent, 10),
    ];
    for key_len in [10, 250] {
        let keys = keys(key_len);
        for (what, with_backups) in [("primary", false), ("replicas", true)] {
            let mut g = c.benchmark_group(format!("router_{what}_key{key_len}"));
            g.throughput(Throughput::Elements(KEYS as u64));
            for (name, kind, n) in rings {
                let r = router(kind, n, if with_backups { n } else { 0 });
                let id = BenchmarkId::new(name, n);
                if with_backups {
                    g.bench_function(id, |b| {
                        b.iter(|| {
                            let mut acc = 0usize;
                            for k in &keys {
                                let rep = r.replicas(black_box(k));
                                acc = acc.wrapping_add(rep.primary() ^ rep.get(1).unwrap_or(0));
                            }
                            acc
                        })
                    });
                } else {
                    g.bench_function(id, |b| {
                        b.iter(|| {
                            let mut acc = 0usize;
                            for k in &keys {
                                acc = acc.wrapping_add(r.primary(black_box(k)));
                            }
                            acc
                        })
                    });
                }
            }
            g.finish();
        }
    }
}

criterion_group!(benches, bench_ring);
criterion_main!(benches);
