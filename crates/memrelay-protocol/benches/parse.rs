//! Parser and composer micro-benchmarks: the per-request CPU the protocol
//! crate costs the proxy, without sockets.
//!
//! Run: `cargo bench -p memrelay-protocol --bench parse`
//! (quick: `-- --warm-up-time 1 --measurement-time 3`).
//!
//! Every input is built before the timed loop. Throughput is in elements per
//! second, where an element is one request parsed (`parse_request`), one
//! reply framed (`ResponseParser`) or one line written (`compose`); for
//! multi-gets the key count is in the benchmark's name.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use memrelay_protocol::{compose, parse_request, Command, Expect, Limits, ResponseParser};

/// Keys like the load benchmark's: 32 bytes, distinct.
fn key(i: usize) -> Vec<u8> {
    format!("memrelay:bench:key:{i:013}").into_bytes()
}

fn value(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'a' + (i % 26) as u8).collect()
}

fn get_line(nkeys: usize) -> Vec<u8> {
    let mut line = b"get".to_vec();
    for i in 0..nkeys {
        line.push(b' ');
        line.extend_from_slice(&key(i));
    }
    line.extend_from_slice(b"\r\n");
    line
}

fn set_request(i: usize, len: usize) -> Vec<u8> {
    let mut r = format!("set {} 0 0 {len}\r\n", String::from_utf8_lossy(&key(i))).into_bytes();
    r.extend_from_slice(&value(len));
    r.extend_from_slice(b"\r\n");
    r
}

/// Parses every request in `buf`; returns how many there were.
fn parse_all(buf: &[u8], limits: &Limits) -> usize {
    let mut at = 0;
    let mut n = 0;
    while at < buf.len() {
        let (req, used) = parse_request(&buf[at..], limits)
            .expect("bench input is valid")
            .expect("bench input is complete");
        black_box(&req);
        at += used;
        n += 1;
    }
    n
}

fn bench_requests(c: &mut Criterion) {
    let limits = Limits::default();
    let mut g = c.benchmark_group("parse_request");
    g.throughput(Throughput::Elements(1));

    let mut single: Vec<(&str, Vec<u8>)> = vec![
        ("get", get_line(1)),
        ("set_100B", set_request(0, 100)),
        ("get_10_keys", get_line(10)),
        ("get_100_keys", get_line(100)),
        (
            "mg_v_f_t",
            b"mg memrelay:bench:key:0000000000001 v f t\r\n".to_vec(),
        ),
        ("mn", b"mn\r\n".to_vec()),
    ];
    let mut ms = b"ms memrelay:bench:key:0000000000001 100 T0 F0\r\n".to_vec();
    ms.extend_from_slice(&value(100));
    ms.extend_from_slice(b"\r\n");
    single.push(("ms_100B", ms));
    single.push((
        "delete",
        b"delete memrelay:bench:key:0000000000001\r\n".to_vec(),
    ));

    for (name, input) in &single {
        assert_eq!(parse_all(input, &limits), 1, "{name}");
        g.bench_with_input(BenchmarkId::from_parameter(name), input, |b, input| {
            b.iter(|| parse_request(black_box(input), &limits))
        });
    }
    g.finish();

    // Pipelines: many requests in one read buffer, parsed back to back as a
    // session does after one large read.
    let mut g = c.benchmark_group("parse_pipeline");
    let mut getset = Vec::new();
    for i in 0..100 {
        if i % 10 == 9 {
            getset.extend_from_slice(&set_request(i, 100));
        } else {
            getset.extend_from_slice(&get_line(1));
        }
    }
    let mut meta = Vec::new();
    for i in 0..100 {
        meta.extend_from_slice(
            format!("mg {} v f q\r\n", String::from_utf8_lossy(&key(i))).as_bytes(),
        );
    }
    meta.extend_from_slice(b"mn\r\n");
    for (name, input) in [("getset_100", &getset), ("mg_q_100_plus_mn", &meta)] {
        let n = parse_all(input, &limits);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(name), input, |b, input| {
            b.iter(|| parse_all(black_box(input), &limits))
        });
    }
    g.finish();
}

fn value_block(out: &mut Vec<u8>, i: usize, len: usize) {
    out.extend_from_slice(b"VALUE ");
    out.extend_from_slice(&key(i));
    out.extend_from_slice(format!(" 0 {len}\r\n").as_bytes());
    out.extend_from_slice(&value(len));
    out.extend_from_slice(b"\r\n");
}

fn bench_responses(c: &mut Criterion) {
    let max_value = Limits::default().max_value_len;
    let mut g = c.benchmark_group("response_parser");
    g.throughput(Throughput::Elements(1));

    let mut hit = Vec::new();
    value_block(&mut hit, 0, 100);
    hit.extend_from_slice(b"END\r\n");
    let mut mget10 = Vec::new();
    for i in 0..10 {
        value_block(&mut mget10, i, 100);
    }
    mget10.extend_from_slice(b"END\r\n");
    let mut va = b"VA 100 f0 t-1\r\n".to_vec();
    va.extend_from_slice(&value(100));
    va.extend_from_slice(b"\r\n");

    let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        ("get_hit_100B", hit, Expect::Retrieval),
        ("get_miss", b"END\r\n".to_vec(), Expect::Retrieval),
        ("mget_10_hits_100B", mget10, Expect::Retrieval),
        ("stored", b"STORED\r\n".to_vec(), Expect::Storage),
        ("mg_hit_VA_100B", va, Expect::Meta),
        ("mg_miss_EN", b"EN\r\n".to_vec(), Expect::Meta),
    ];
    let mut parser = ResponseParser::new();
    for (name, input, expect) in &cases {
        let r = parser.parse(input, *expect, max_value);
        assert!(
            matches!(r, Ok(Some((_, n))) if n == input.len()),
            "{name}: {r:?}"
        );
        g.bench_with_input(BenchmarkId::from_parameter(name), input, |b, input| {
            b.iter(|| parser.parse(black_box(input), *expect, max_value))
        });
    }
    g.finish();
}

fn bench_compose(c: &mut Criterion) {
    let mut g = c.benchmark_group("compose");
    g.throughput(Throughput::Elements(1));
    let keys: Vec<Vec<u8>> = (0..10).map(key).collect();
    let k0 = key(0);
    let mut out: Vec<u8> = Vec::with_capacity(4096);

    g.bench_function("get_1_key", |b| {
        b.iter(|| {
            out.clear();
            compose::retrieval(&mut out, Command::Get, 0, [black_box(&k0[..])]);
            out.len()
        })
    });
    g.bench_function("get_10_keys", |b| {
        b.iter(|| {
            out.clear();
            compose::retrieval(
                &mut out,
                Command::Get,
                0,
                black_box(&keys).iter().map(|k| &k[..]),
            );
            out.len()
        })
    });
    g.bench_function("set_line", |b| {
        b.iter(|| {
            out.clear();
            compose::storage_line(&mut out, Command::Set, black_box(&k0), 0, 0, 100, 0);
            out.len()
        })
    });
    g.bench_function("mg_line", |b| {
        b.iter(|| {
            out.clear();
            compose::meta_line(&mut out, Command::MetaGet, black_box(&k0), None, b"v f t");
            out.len()
        })
    });
    g.bench_function("value_header", |b| {
        b.iter(|| {
            out.clear();
            compose::value_header(&mut out, black_box(&k0), 0, 100, None);
            out.len()
        })
    });
    g.finish();
}

criterion_group!(benches, bench_requests, bench_responses, bench_compose);
criterion_main!(benches);
