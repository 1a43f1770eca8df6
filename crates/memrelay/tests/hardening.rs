//! Hardening (docs/security.md): no client, scraper or disconnect takes the
//! proxy or its servers down. Each test plays one attack, scaled down to
//! stay quick, against real memcached processes on loopback.

#![allow(clippy::unwrap_used, clippy::panic)]

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// A memrelay started with a soft open-file limit of 64, so that it raises
/// the limit to exactly what it computes it needs (as under a low
/// `ulimit -n`); killed on drop.
struct Limited {
    child: Child,
    port: u16,
}

impl Limited {
    fn start(args: &[String]) -> Limited {
        let port = free_port("127.0.0.1");
        let mut cmd = Command::new(memrelay_bin());
        cmd.args(["-l", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: getrlimit/setrlimit are async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                let mut lim = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                lim.rlim_cur = 64;
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        let l = Limited { child, port };
        let addr = l.addr();
        assert!(
            wait_until(START_DEADLINE, || TcpStream::connect(&addr).is_ok()),
            "memrelay did not start"
        );
        l
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Its soft open-file limit, from /proc.
    fn nofile(&self) -> u64 {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.child.id())).unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        line.split_whitespace().nth(3).unwrap().parse().unwrap()
    }
}

impl Drop for Limited {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Keys that land on every one of `servers` (checked on the servers
/// themselves after a set through the proxy).
fn set_spread(proxy: &str, servers: &[&Memcached], n: usize) -> Vec<String> {
    let mut c = Client::with_sentinel(proxy);
    let mut keys = Vec::new();
    for i in 0..n {
        let key = format!("spread-{i}");
        let r = c.exchange(format!("set {key} 0 0 1\r\nx\r\n").as_bytes());
        assert_eq!(r.bytes, b"STORED\r\n", "set {key}: {}", escape(&r.bytes));
        keys.push(key);
    }
    for s in servers {
        let mut direct = s.client();
        let held = keys.iter().any(|k| {
            direct
                .send_until(format!("get {k}\r\n").as_bytes(), complete_retrieval)
                .bytes
                .starts_with(b"VALUE")
        });
        assert!(held, "no key of {n} went to {}", s.addr());
    }
    keys
}

/// Keeps `n` connections open to `addr`, opening a new one whenever the
/// far end closes one, until `stop` is set (an attacker's idle flood).
fn flood(
    addr: String,
    n: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut open: Vec<TcpStream> = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            open.retain(|s| {
                let mut b = [0u8; 1];
                // Nonblocking: 0 bytes is the far end's close.
                match s.peek(&mut b) {
                    Ok(0) => false,
                    Ok(_) => true,
                    Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                }
            });
            while open.len() < n {
                match TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(200))
                {
                    Ok(s) => {
                        s.set_nonblocking(true).unwrap();
                        open.push(s);
                    }
                    Err(_) => break,
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}

/// Issue #17, 1: 300 idle connections to the metrics port once took every
/// descriptor left: new clients got no answer and the servers' probes and
/// connections failed. Scrapers are now capped, within the file budget.
#[test]
fn a_metrics_flood_leaves_the_servers_up_and_clients_served() {
    let servers = [Memcached::start(), Memcached::start(), Memcached::start()];
    let metrics = join_host_port("127.0.0.1", free_port("127.0.0.1"));
    let mut args: Vec<String> = ["-t", "1", "-n", "20", "--metrics", &metrics]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for s in &servers {
        args.extend(["-s".to_string(), s.addr()]);
    }
    let proxy = Limited::start(&args);
    let limit = proxy.nofile();
    assert!(limit < 300, "the limit {limit} leaves nothing to exhaust");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooder = flood(metrics.clone(), 300, stop.clone());
    // Let the flood take what the proxy would give it.
    std::thread::sleep(Duration::from_millis(500));
    // A new client, and keys on every server (their connections are
    // opened now, under the flood).
    let refs: Vec<&Memcached> = servers.iter().collect();
    let keys = set_spread(&proxy.addr(), &refs, 30);
    let mut c = Client::with_sentinel(&proxy.addr());
    for k in &keys {
        let r = c.exchange(format!("get {k}\r\n").as_bytes());
        assert!(
            r.bytes.starts_with(b"VALUE"),
            "get {k}: {}",
            escape(&r.bytes)
        );
    }
    let st = stats(&proxy.addr());
    for i in 0..servers.len() {
        assert_eq!(st[&format!("server:{i}:state")], "up", "{st:?}");
        assert_eq!(st[&format!("server:{i}:failures")], "0", "{st:?}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flooder.join().unwrap();
    // The endpoint serves again once the flood is gone.
    assert!(wait_until(Duration::from_secs(15), || {
        http_get(&metrics, "/healthz").0 == 200
    }));
}

/// Issue #17, 7: a request with bare-LF line endings is answered at once.
#[test]
fn metrics_answers_bare_lf_requests() {
    let server = Memcached::start();
    let metrics = join_host_port("127.0.0.1", free_port("127.0.0.1"));
    let _proxy = Memrelay::start(&["-s", &server.addr(), "--metrics", &metrics]);
    let mut s = TcpStream::connect(&metrics).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    s.write_all(b"GET /healthz HTTP/1.1\nHost: x\n\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

/// Issue #17, 6: with `--auth-file`, `/metrics` (which names every server)
/// needs one of its users, by HTTP basic authentication; the health checks
/// stay open.
#[test]
fn metrics_asks_for_the_auth_file_credentials() {
    let server = Memcached::start();
    let dir = TempDir::new("metrics-auth");
    let auth = dir.file("auth", "scraper:s3cret\n");
    std::fs::set_permissions(&auth, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let metrics = join_host_port("127.0.0.1", free_port("127.0.0.1"));
    let _proxy = Memrelay::start(&[
        "-s",
        &server.addr(),
        "--metrics",
        &metrics,
        "--auth-file",
        auth.to_str().unwrap(),
    ]);
    let get = |path: &str, header: &str| -> String {
        let mut s = TcpStream::connect(&metrics).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n{header}\r\n").unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        reply
    };
    let open = get("/metrics", "");
    assert!(open.starts_with("HTTP/1.1 401"), "{open}");
    assert!(!open.contains(&server.addr()), "{open}");
    assert!(open
        .to_ascii_lowercase()
        .contains("www-authenticate: basic"));
    // base64("scraper:wrong")
    let wrong = get("/metrics", "Authorization: Basic c2NyYXBlcjp3cm9uZw==\r\n");
    assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
    // base64("scraper:s3cret")
    let right = get("/metrics", "Authorization: Basic c2NyYXBlcjpzM2NyZXQ=\r\n");
    assert!(right.starts_with("HTTP/1.1 200"), "{right}");
    assert!(right.contains(&server.addr()));
    assert!(get("/healthz", "").starts_with("HTTP/1.1 200"));
}

/// The value of a counter in a Prometheus exposition.
fn metric(body: &str, name: &str) -> u64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{body}"))
}

/// Issue #17, 6: `stats reset` once zeroed the Prometheus counters, which
/// hid failed authentications. Now only the `stats` reply starts again.
#[test]
fn counters_survive_stats_reset() {
    let server = Memcached::start();
    let dir = TempDir::new("reset");
    let auth = dir.file("auth", "app:pw\n");
    std::fs::set_permissions(&auth, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let metrics = join_host_port("127.0.0.1", free_port("127.0.0.1"));
    let proxy = Memrelay::start(&[
        "-s",
        &server.addr(),
        "--metrics",
        &metrics,
        "--auth-file",
        auth.to_str().unwrap(),
    ]);
    let mut c = Client::connect(&proxy.addr());
    for _ in 0..5 {
        let r = c.send_until(b"set a 0 0 8\r\napp nope\r\n", |b| b.ends_with(b"\r\n"));
        assert_eq!(r.bytes, b"CLIENT_ERROR authentication failure\r\n");
    }
    let r = c.send_until(b"set a 0 0 6\r\napp pw\r\n", |b| b.ends_with(b"\r\n"));
    assert_eq!(r.bytes, b"STORED\r\n");
    let r = c.send_until(b"stats reset\r\n", |b| b.ends_with(b"\r\n"));
    assert_eq!(r.bytes, b"RESET\r\n");
    let r = c.send_until(b"stats\r\n", |b| b.ends_with(b"END\r\n"));
    let st = parse_stats(&r.bytes);
    assert_eq!(st["auth_errors"], "0", "the stats reply starts again");
    assert_eq!(st["curr_connections"], "1", "a gauge is not reset");
    let body = http_get_auth(&metrics, "/metrics", "Basic YXBwOnB3"); // app:pw
    assert_eq!(metric(&body, "memrelay_auth_errors_total"), 5, "{body}");
    assert_eq!(metric(&body, "memrelay_auth_cmds_total"), 6);
    // Counted on after the reset in both views.
    let r = c.send_until(b"get x\r\n", |b| b.ends_with(b"END\r\n"));
    assert_eq!(r.bytes, b"END\r\n");
    let r = c.send_until(b"stats\r\n", |b| b.ends_with(b"END\r\n"));
    assert_eq!(parse_stats(&r.bytes)["cmd_get"], "1");
}

/// GET with an Authorization header; the body of a 200 reply.
fn http_get_auth(addr: &str, path: &str, auth: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    reply.split_once("\r\n\r\n").unwrap().1.to_string()
}
