//! Open-loop latency probe for `scripts/latency-bench`: sends `get`s to one
//! memcached-speaking address at a fixed total rate and prints latency
//! percentiles as one JSON line.
//!
//! Free of coordinated omission: request `j` is due at `start + j / rate`,
//! a schedule fixed in advance, and its latency runs from that due time to
//! the moment its reply is read. A slow reply therefore never delays later
//! sends (each connection has its own sender and receiver thread), and a
//! sender that falls behind its schedule is charged for it. Requests are
//! spread round-robin over `--conns` connections; every get hits one of
//! `--keys` keys stored beforehand (`--value-size` bytes).
//!
//! ```text
//! cargo run --release --example latency -- --addr 127.0.0.1:11211 \
//!     --rate 10000 --conns 4 --duration 10 --warmup 2
//! ```
//!
//! stdout: `window-start` and `window-end` lines when the measured window
//! begins and ends (so a caller can sample CPU), then the JSON result.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Opts {
    addr: String,
    rate: f64,
    conns: usize,
    duration: f64,
    warmup: f64,
    keys: usize,
    value_size: usize,
}

fn usage(msg: &str) -> ! {
    eprintln!("latency: {msg}");
    eprintln!(
        "usage: latency --addr HOST:PORT [--rate N/s] [--conns N] [--duration S] \
         [--warmup S] [--keys N] [--value-size B]"
    );
    std::process::exit(2)
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        addr: String::new(),
        rate: 2000.0,
        conns: 4,
        duration: 10.0,
        warmup: 2.0,
        keys: 1000,
        value_size: 100,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let val = it.next().unwrap_or_else(|| usage("missing value"));
        let num = || -> f64 { val.parse().unwrap_or_else(|_| usage("bad number")) };
        match flag.as_str() {
            "--addr" => o.addr = val.clone(),
            "--rate" => o.rate = num(),
            "--conns" => o.conns = num() as usize,
            "--duration" => o.duration = num(),
            "--warmup" => o.warmup = num(),
            "--keys" => o.keys = num() as usize,
            "--value-size" => o.value_size = num() as usize,
            _ => usage("unknown option"),
        }
    }
    if o.addr.is_empty() || o.rate <= 0.0 || o.conns == 0 || o.keys == 0 {
        usage("need --addr, and positive --rate, --conns, --keys");
    }
    o
}

fn key(i: usize) -> String {
    format!("memrelay:latency:{i:015}")
}

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| usage(&format!("connect {addr}: {e}")));
    s.set_nodelay(true).ok();
    s
}

/// Stores every key, pipelined in batches, and checks the replies.
fn preload(o: &Opts) {
    let mut s = connect(&o.addr);
    let value = vec![b'v'; o.value_size];
    let mut buf = vec![0u8; 65536];
    for chunk in (0..o.keys).collect::<Vec<_>>().chunks(100) {
        let mut req = Vec::new();
        for &i in chunk {
            req.extend_from_slice(format!("set {} 0 0 {}\r\n", key(i), o.value_size).as_bytes());
            req.extend_from_slice(&value);
            req.extend_from_slice(b"\r\n");
        }
        s.write_all(&req)
            .unwrap_or_else(|e| usage(&format!("preload: {e}")));
        let want = b"STORED\r\n".len() * chunk.len();
        let mut got = Vec::new();
        while got.len() < want {
            let n = s.read(&mut buf).unwrap_or(0);
            if n == 0 {
                usage("preload: connection closed");
            }
            got.extend_from_slice(&buf[..n]);
        }
        if got != b"STORED\r\n".repeat(chunk.len()) {
            usage("preload: unexpected reply");
        }
    }
}

/// (due, actually sent) times of the requests sent and not yet answered,
/// oldest first.
#[derive(Default)]
struct InFlight {
    q: Mutex<VecDeque<(Instant, Instant)>>,
}

#[derive(Default)]
struct ConnResult {
    /// From the due time to the reply: what a client at this rate sees.
    latencies_ns: Vec<u64>,
    /// From the actual send to the reply: the round trip alone, without the
    /// load generator's own lateness.
    rtt_ns: Vec<u64>,
    send_lag_ns: Vec<u64>,
    misses: u64,
}

fn run_conn(
    o: &Opts,
    c: usize,
    start: Instant,
    measure_from: Instant,
    end: Instant,
    failed: &AtomicBool,
) -> ConnResult {
    let stream = connect(&o.addr);
    let mut reader = stream
        .try_clone()
        .unwrap_or_else(|e| usage(&format!("clone: {e}")));
    reader
        .set_read_timeout(Some(Duration::from_millis(100)))
        .ok();
    let inflight = Arc::new(InFlight::default());
    let sent = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let period = 1.0 / o.rate;
    let stride = o.conns;

    std::thread::scope(|sc| {
        let sender = sc.spawn(|| {
            let mut w = &stream;
            let mut lag = Vec::new();
            let mut k = 0usize;
            loop {
                let j = c + k * stride;
                let due = start + Duration::from_secs_f64(j as f64 * period);
                if due >= end {
                    break;
                }
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let line = format!("get {}\r\n", key(j % o.keys));
                let sent_at = Instant::now();
                inflight
                    .q
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_back((due, sent_at));
                sent.fetch_add(1, Ordering::Release);
                if w.write_all(line.as_bytes()).is_err() {
                    failed.store(true, Ordering::Relaxed);
                    break;
                }
                if due >= measure_from {
                    lag.push(sent_at.saturating_duration_since(due).as_nanos() as u64);
                }
                k += 1;
            }
            done.store(true, Ordering::Release);
            lag
        });

        let mut lat = Vec::new();
        let mut rtt = Vec::new();
        let mut misses = 0u64;
        let mut answered = 0u64;
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
        let mut chunk = vec![0u8; 1 << 16];
        let finder = memchr::memmem::Finder::new(b"END\r\n");
        let mut idle_since: Option<Instant> = None;
        loop {
            if done.load(Ordering::Acquire) && answered == sent.load(Ordering::Acquire) {
                break;
            }
            match reader.read(&mut chunk) {
                Ok(0) => {
                    failed.store(true, Ordering::Relaxed);
                    break;
                }
                Ok(n) => {
                    let now = Instant::now();
                    idle_since = None;
                    buf.extend_from_slice(&chunk[..n]);
                    let mut at = 0;
                    while let Some(p) = finder.find(&buf[at..]) {
                        let reply = &buf[at..at + p + 5];
                        let (due, sent_at) = inflight
                            .q
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .pop_front()
                            .unwrap_or((now, now));
                        if !reply.starts_with(b"VALUE ") {
                            misses += 1;
                        }
                        if due >= measure_from {
                            lat.push(now.saturating_duration_since(due).as_nanos() as u64);
                            rtt.push(now.saturating_duration_since(sent_at).as_nanos() as u64);
                        }
                        answered += 1;
                        at += p + 5;
                    }
                    buf.drain(..at);
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    // Give up on replies that never come (a broken target).
                    let since = *idle_since.get_or_insert_with(Instant::now);
                    if done.load(Ordering::Acquire) && since.elapsed() > Duration::from_secs(5) {
                        failed.store(true, Ordering::Relaxed);
                        break;
                    }
                }
                Err(_) => {
                    failed.store(true, Ordering::Relaxed);
                    break;
                }
            }
        }
        let lag = sender.join().unwrap_or_default();
        ConnResult {
            latencies_ns: lat,
            rtt_ns: rtt,
            send_lag_ns: lag,
            misses,
        }
    })
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

fn main() {
    let o = parse_opts();
    // Sleeps wake up when asked, not up to 50 µs later (the default slack):
    // every thread spawned from here inherits it.
    // SAFETY: prctl with PR_SET_TIMERSLACK takes one integer argument.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
    preload(&o);
    let start = Instant::now() + Duration::from_millis(200);
    let measure_from = start + Duration::from_secs_f64(o.warmup);
    let end = measure_from + Duration::from_secs_f64(o.duration);
    let failed = AtomicBool::new(false);
    let results: Vec<ConnResult> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..o.conns)
            .map(|c| {
                let (o, failed) = (&o, &failed);
                sc.spawn(move || run_conn(o, c, start, measure_from, end, failed))
            })
            .collect();
        let mark = |t: Instant, what: &str| {
            if let Some(d) = t.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
            println!("{what}");
            std::io::stdout().flush().ok();
        };
        mark(measure_from, "window-start");
        mark(end, "window-end");
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut lat: Vec<u64> = results
        .iter()
        .flat_map(|r| r.latencies_ns.iter().copied())
        .collect();
    let mut rtt: Vec<u64> = results
        .iter()
        .flat_map(|r| r.rtt_ns.iter().copied())
        .collect();
    let mut lag: Vec<u64> = results
        .iter()
        .flat_map(|r| r.send_lag_ns.iter().copied())
        .collect();
    let misses: u64 = results.iter().map(|r| r.misses).sum();
    lat.sort_unstable();
    lag.sort_unstable();
    rtt.sort_unstable();
    let mean = lat.iter().sum::<u64>() as f64 / lat.len().max(1) as f64 / 1000.0;
    println!(
        "{{\"requests\":{},\"achieved_rate\":{:.1},\"misses\":{},\"failed\":{},\
         \"mean_us\":{:.2},\"p50_us\":{:.2},\"p90_us\":{:.2},\"p99_us\":{:.2},\
         \"p999_us\":{:.2},\"max_us\":{:.2},\"rtt_p50_us\":{:.2},\"rtt_p99_us\":{:.2},\
         \"rtt_p999_us\":{:.2},\"send_lag_p50_us\":{:.2},\
         \"send_lag_p99_us\":{:.2},\"send_lag_max_us\":{:.2}}}",
        lat.len(),
        lat.len() as f64 / o.duration,
        misses,
        failed.load(Ordering::Relaxed),
        mean,
        pct(&lat, 50.0),
        pct(&lat, 90.0),
        pct(&lat, 99.0),
        pct(&lat, 99.9),
        lat.last().copied().unwrap_or(0) as f64 / 1000.0,
        pct(&rtt, 50.0),
        pct(&rtt, 99.0),
        pct(&rtt, 99.9),
        pct(&lag, 50.0),
        pct(&lag, 99.0),
        lag.last().copied().unwrap_or(0) as f64 / 1000.0,
    );
}
