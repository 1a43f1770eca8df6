//! Shared integration-test harness: process guards for memcached and
//! memrelay, and a blocking client whose every read has a deadline.
//!
//! Used by every test file through `mod support;`. Not every test file uses
//! every helper, hence the `dead_code` allowance.
#![allow(dead_code)]
#![allow(clippy::panic, clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long a server may take to start accepting connections.
pub const START_DEADLINE: Duration = Duration::from_secs(10);
/// Default deadline for one exchange (request written, whole reply read).
pub const IO_DEADLINE: Duration = Duration::from_secs(5);

const SENTINEL_KEY: &str = "__sentinel__";
const SENTINEL_VALUE: &str = "memrelay-harness-sentinel-7c1e0f93";

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

/// Renders bytes for a failure message: printable ASCII as is, the rest
/// escaped, `\r\n` kept visible. Long inputs are cut in the middle.
pub fn escape(bytes: &[u8]) -> String {
    escape_max(bytes, 4000)
}

/// `escape`, keeping at most about `max` input bytes (head and tail).
pub fn escape_max(bytes: &[u8], max: usize) -> String {
    let max = max.max(2);
    let render = |b: &[u8]| -> String {
        let mut s = String::new();
        for &c in b {
            match c {
                b'\r' => s.push_str("\\r"),
                b'\n' => s.push_str("\\n\n"),
                b'\\' => s.push_str("\\\\"),
                0x20..=0x7e => s.push(c as char),
                _ => s.push_str(&format!("\\x{c:02x}")),
            }
        }
        s
    };
    if bytes.len() <= max {
        render(bytes)
    } else {
        format!(
            "{}\n... [{} bytes omitted] ...\n{}",
            render(&bytes[..max / 2]),
            bytes.len() - max / 2 * 2,
            render(&bytes[bytes.len() - max / 2..])
        )
    }
}

/// Polls `cond` until it returns true or `deadline` elapses.
pub fn wait_until(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    let mut pause = Duration::from_millis(1);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// A loopback port that was free a moment ago (bind to :0, read, drop).
pub fn free_port(host: &str) -> u16 {
    let l = TcpListener::bind((host, 0)).unwrap_or_else(|e| panic!("bind {host}:0: {e}"));
    l.local_addr().expect("local_addr").port()
}

/// `host:port`, with brackets for IPv6 literals.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn resolve(addr: &str) -> SocketAddr {
    addr.to_socket_addrs()
        .unwrap_or_else(|e| panic!("resolve {addr}: {e}"))
        .next()
        .unwrap_or_else(|| panic!("{addr} resolved to nothing"))
}

fn can_connect(addr: &str) -> bool {
    TcpStream::connect_timeout(&resolve(addr), Duration::from_millis(500)).is_ok()
}

/// The state letter of a process (`R`, `S`, `T`...), from /proc.
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the parenthesised command name.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}) failed: {}",
        std::io::Error::last_os_error()
    );
}

fn kill_and_reap(child: &mut Child) {
    // SIGKILL also ends a SIGSTOPped process.
    let _ = child.kill();
    let _ = child.wait();
}

/// Reads a child's pipe into a shared buffer until EOF, on a thread.
fn drain_into(mut pipe: impl Read + Send + 'static, buf: Arc<Mutex<Vec<u8>>>) {
    thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.lock().expect("log lock").extend_from_slice(&chunk[..n]),
            }
        }
    });
}

/// A directory of its own for each test (configuration files), removed
/// when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("memrelay-config-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// Where `name` in the directory is.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `text` to `name` in the directory and returns its path.
    pub fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `stats` of a memcached or of the proxy, as a map. (The deadline allows
/// for a proxy under a hostile load.)
pub fn stats(addr: &str) -> HashMap<String, String> {
    let mut c = Client::connect(addr);
    c.set_deadline(Duration::from_secs(10));
    let r = c.send_until(b"stats\r\n", |b| b.ends_with(b"END\r\n"));
    assert_eq!(
        r.end,
        End::Complete,
        "stats from {addr}: {}",
        escape(&r.bytes)
    );
    parse_stats(&r.bytes)
}

/// A `stats` reply's `STAT name value` lines, as a map.
pub fn parse_stats(reply: &[u8]) -> HashMap<String, String> {
    String::from_utf8_lossy(reply)
        .lines()
        .filter_map(|l| {
            let mut t = l.strip_prefix("STAT ")?.splitn(2, ' ');
            Some((t.next()?.to_string(), t.next()?.to_string()))
        })
        .collect()
}

/// One number from `stats`.
pub fn stat_u64(addr: &str, name: &str) -> u64 {
    let s = stats(addr);
    s.get(name)
        .unwrap_or_else(|| panic!("stats of {addr} has no {name}: {s:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("stats {name} of {addr} is not a number: {s:?}"))
}

// ---------------------------------------------------------------------------
// memcached
// ---------------------------------------------------------------------------

/// The memcached binary: `$MEMCACHED_BIN`, else `memcached` on PATH, else
/// /usr/bin/memcached. Panics (never skips) when it is not installed.
pub fn memcached_bin() -> String {
    if let Ok(p) = std::env::var("MEMCACHED_BIN") {
        return p;
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let cand = dir.join("memcached");
            if cand.is_file() {
                return cand.to_string_lossy().into_owned();
            }
        }
    }
    let fallback = "/usr/bin/memcached";
    if std::path::Path::new(fallback).is_file() {
        return fallback.to_string();
    }
    panic!(
        "memcached binary not found (looked at $MEMCACHED_BIN, PATH and {fallback}). \
         These tests need a real memcached: install it (e.g. `apt-get install memcached`)."
    );
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A memcached server on a loopback port; SIGKILLed and reaped on drop.
#[derive(Debug)]
pub struct Memcached {
    child: Option<Child>,
    host: String,
    port: u16,
    /// Arguments beyond the harness's own (kept for restarts).
    extra: Vec<String>,
}

impl Memcached {
    /// memcached on 127.0.0.1, a fresh free port.
    pub fn start() -> Memcached {
        Memcached::start_on("127.0.0.1")
    }

    /// memcached on `host` (a loopback literal: "127.0.0.1" or "::1").
    pub fn start_on(host: &str) -> Memcached {
        Memcached::start_with(host, &[])
    }

    /// memcached on `host` with more arguments (e.g. `-Y authfile`).
    pub fn start_with(host: &str, extra: &[&str]) -> Memcached {
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port(host);
            match spawn_memcached(host, port, &extra) {
                Ok(child) => {
                    return Memcached {
                        child: Some(child),
                        host: host.to_string(),
                        port,
                        extra,
                    };
                }
                Err(e) => last_err = e,
            }
        }
        panic!("could not start memcached on {host}: {last_err}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// "127.0.0.1:PORT" or "[::1]:PORT".
    pub fn addr(&self) -> String {
        join_host_port(&self.host, self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("memcached is not running").id()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL the server and reap it. Its port is then closed.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_and_reap(&mut c);
        }
    }

    /// Kill (if running) and start again on the same port (empty cache).
    pub fn restart(&mut self) {
        self.kill();
        let end = Instant::now() + START_DEADLINE;
        loop {
            match spawn_memcached(&self.host, self.port, &self.extra) {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                Err(e) if Instant::now() >= end => {
                    panic!("could not restart memcached on {}: {e}", self.addr())
                }
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// SIGSTOP: the server keeps its socket but stops answering.
    /// SIGSTOP, and wait until the kernel shows the process stopped: the
    /// signal is asynchronous, and a request sent right after it could
    /// otherwise still be answered.
    pub fn stop(&mut self) {
        let pid = self.pid();
        signal(pid, libc::SIGSTOP);
        let stopped = wait_until(START_DEADLINE, || proc_state(pid) == Some('T'));
        assert!(stopped, "memcached {pid} never showed as stopped");
    }

    /// SIGCONT: resume after `stop`.
    pub fn cont(&mut self) {
        let pid = self.pid();
        signal(pid, libc::SIGCONT);
        let running = wait_until(START_DEADLINE, || proc_state(pid) != Some('T'));
        assert!(running, "memcached {pid} never resumed");
    }

    /// A client connected straight to this server.
    pub fn client(&self) -> Client {
        Client::connect(&self.addr())
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts memcached and waits (with a deadline) until it answers `version`.
/// Err when it exited early (port taken) or never became ready.
fn spawn_memcached(host: &str, port: u16, extra: &[String]) -> Result<Child, String> {
    let bin = memcached_bin();
    let mut cmd = Command::new(&bin);
    cmd.args([
        "-U",
        "0",
        "-l",
        host,
        "-p",
        &port.to_string(),
        "-t",
        "1",
        "-m",
        "64",
    ]);
    if is_root() {
        cmd.args(["-u", "root"]);
    }
    cmd.args(extra);
    // stderr is drained on a thread: `verbosity` makes memcached log there,
    // and an undrained pipe would eventually block it.
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "cannot run {bin}: {e}. These tests need a real memcached: install it \
             (e.g. `apt-get install memcached`)."
        ),
        Err(e) => panic!("cannot run {bin}: {e}"),
    };
    let log = Arc::new(Mutex::new(Vec::new()));
    drain_into(child.stderr.take().expect("stderr"), Arc::clone(&log));
    let addr = join_host_port(host, port);
    let end = Instant::now() + START_DEADLINE;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            wait_until(Duration::from_secs(1), || Arc::strong_count(&log) == 1);
            let err = String::from_utf8_lossy(&log.lock().expect("log")).into_owned();
            return Err(format!("memcached exited early ({status}): {}", err.trim()));
        }
        // A memcached speaking TLS (-Z) would take `version` for a broken
        // handshake: for it, an accepted connection is the sign of life
        // (the kernel queues connections once memcached listens).
        let up = if extra.iter().any(|a| a == "-Z") {
            TcpStream::connect_timeout(&resolve(&addr), Duration::from_millis(500)).is_ok()
        } else {
            answers(&addr)
        };
        if up {
            // Still ours? (Another process could own the port.)
            if let Ok(None) = child.try_wait() {
                return Ok(child);
            }
            continue;
        }
        if Instant::now() >= end {
            kill_and_reap(&mut child);
            return Err(format!(
                "memcached on {addr} not ready within {START_DEADLINE:?}"
            ));
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Whether a memcached answers `version` (or, started with `-Y`, refuses
/// it for want of authentication: it is up all the same).
fn answers(addr: &str) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&resolve(addr), Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"version\r\n").is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 256];
    while !buf.ends_with(b"\r\n") {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    buf.starts_with(b"VERSION ") || buf == b"CLIENT_ERROR unauthenticated\r\n"
}

// ---------------------------------------------------------------------------
// memrelay
// ---------------------------------------------------------------------------

pub fn memrelay_bin() -> &'static str {
    env!("CARGO_BIN_EXE_memrelay")
}

/// A running memrelay (`-l 127.0.0.1 -p PORT` + the given args); killed on
/// drop. Its stdout and stderr are captured for diagnostics.
#[derive(Debug)]
pub struct Memrelay {
    child: Option<Child>,
    port: u16,
    args: Vec<String>,
    log: Arc<Mutex<Vec<u8>>>,
}

impl Memrelay {
    /// Starts memrelay with `args` and waits (deadline) until its port
    /// accepts connections. Panics with its output if it never does.
    pub fn start<S: AsRef<str>>(args: &[S]) -> Memrelay {
        let args: Vec<String> = args.iter().map(|a| a.as_ref().to_string()).collect();
        Memrelay::start_with(|port| {
            let mut all: Vec<String> = vec!["-l".into(), "127.0.0.1".into(), "-p".into()];
            all.push(port.to_string());
            all.extend(args.iter().cloned());
            all
        })
    }

    /// Starts memrelay with exactly the arguments `args(port)` returns for
    /// a free port on 127.0.0.1 (which they must make it listen on, with
    /// flags or a config file), and waits as `start` does.
    pub fn start_with(args: impl Fn(u16) -> Vec<String>) -> Memrelay {
        let mut failures = Vec::new();
        for _ in 0..3 {
            let port = free_port("127.0.0.1");
            let args = args(port);
            let log = Arc::new(Mutex::new(Vec::new()));
            let mut child = Command::new(memrelay_bin())
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", memrelay_bin()));
            drain_into(child.stdout.take().expect("stdout"), Arc::clone(&log));
            drain_into(child.stderr.take().expect("stderr"), Arc::clone(&log));
            let addr = join_host_port("127.0.0.1", port);
            let mut exited = None;
            let ready = wait_until(START_DEADLINE, || {
                if let Ok(Some(st)) = child.try_wait() {
                    exited = Some(st);
                    return true;
                }
                can_connect(&addr)
            });
            match (ready, exited) {
                (true, None) => {
                    return Memrelay {
                        child: Some(child),
                        port,
                        args,
                        log,
                    };
                }
                (_, Some(st)) => {
                    // Give the drain threads a moment to collect the last output.
                    wait_until(Duration::from_millis(500), || Arc::strong_count(&log) == 1);
                    let out = String::from_utf8_lossy(&log.lock().expect("log")).into_owned();
                    failures.push(format!(
                        "exited early ({st}) on port {port}; output:\n{out}"
                    ));
                }
                (false, None) => {
                    // Not a port race (that exits early): retrying would
                    // only multiply the wait.
                    kill_and_reap(&mut child);
                    let out = String::from_utf8_lossy(&log.lock().expect("log")).into_owned();
                    panic!(
                        "memrelay {args:?}: port {port} not accepting connections within \
                         {START_DEADLINE:?}; output:\n{out}"
                    );
                }
            }
        }
        panic!("memrelay did not start:\n{}", failures.join("\n---\n"));
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The exit code if the process has exited (reaping it), else None.
    pub fn try_exit(&mut self) -> Option<i32> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(st)) => Some(st.code().unwrap_or(-1)),
            _ => None,
        }
    }

    /// The proxy's process id.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(|c| c.id())
            .expect("memrelay is running")
    }

    pub fn addr(&self) -> String {
        join_host_port("127.0.0.1", self.port)
    }

    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Everything memrelay wrote to stdout/stderr so far.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().expect("log")).into_owned()
    }

    /// Has the process exited (e.g. crashed)? Returns its status if so.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_and_reap(&mut c);
        }
    }

    /// SIGTERM, then waits (deadline) for the process to exit; returns its
    /// exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        signal(self.pid(), libc::SIGTERM);
        let mut code = None;
        wait_until(Duration::from_secs(15), || {
            code = self.try_exit();
            code.is_some()
        });
        code
    }

    /// SIGHUP: reload the configuration.
    pub fn hangup(&self) {
        signal(self.pid(), libc::SIGHUP);
    }

    /// Waits until the output holds `text` at least `n` times; panics with
    /// the output after `deadline`.
    pub fn wait_for_output(&self, text: &str, n: usize, deadline: Duration) {
        let seen = wait_until(deadline, || self.output().matches(text).count() >= n);
        assert!(
            seen,
            "{text:?} not logged {n} time(s) within {deadline:?}; output:\n{}",
            self.output()
        );
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.addr())
    }
}

impl Drop for Memrelay {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Outcome of running memrelay to completion (for CLI tests).
#[derive(Debug)]
pub struct RunOutput {
    /// None when it was still running at the deadline (it was then killed).
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    /// Did anything accept a connection on `watch_port` while it ran?
    pub port_was_bound: bool,
}

/// Runs memrelay with exactly `args`, waiting at most `deadline` for it to
/// exit. While it runs, keeps trying to connect to `watch_port` (if any).
pub fn run_memrelay<S: AsRef<str>>(
    args: &[S],
    deadline: Duration,
    watch_port: Option<u16>,
) -> RunOutput {
    let mut child = Command::new(memrelay_bin())
        .args(args.iter().map(|a| a.as_ref()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", memrelay_bin()));
    let out = Arc::new(Mutex::new(Vec::new()));
    let err = Arc::new(Mutex::new(Vec::new()));
    drain_into(child.stdout.take().expect("stdout"), Arc::clone(&out));
    drain_into(child.stderr.take().expect("stderr"), Arc::clone(&err));
    let mut status = None;
    let mut bound = false;
    wait_until(deadline, || {
        if let Some(p) = watch_port {
            if TcpStream::connect_timeout(
                &SocketAddr::from(([127, 0, 0, 1], p)),
                Duration::from_millis(100),
            )
            .is_ok()
            {
                bound = true;
            }
        }
        if let Ok(Some(st)) = child.try_wait() {
            status = Some(st);
            return true;
        }
        false
    });
    if status.is_none() {
        kill_and_reap(&mut child);
    }
    // The pipes close when the process is gone; let the drain threads finish.
    wait_until(Duration::from_secs(2), || {
        Arc::strong_count(&out) == 1 && Arc::strong_count(&err) == 1
    });
    let stdout = String::from_utf8_lossy(&out.lock().expect("out")).into_owned();
    let stderr = String::from_utf8_lossy(&err.lock().expect("err")).into_owned();
    RunOutput {
        status,
        stdout,
        stderr,
        port_was_bound: bound,
    }
}

/// A plain HTTP GET (the metrics endpoint): status code and body. The
/// server closes the connection after its reply.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(IO_DEADLINE)).expect("read timeout");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap_or_else(|e| panic!("write to {addr}: {e}"));
    let mut reply = Vec::new();
    s.read_to_end(&mut reply)
        .unwrap_or_else(|e| panic!("read from {addr}: {e}"));
    let text = String::from_utf8(reply).expect("an HTTP reply in UTF-8");
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

// ---------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------

/// How the reading of a reply stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The reply is complete: the sentinel reply arrived (it is stripped),
    /// or the caller's completion test said so.
    Complete,
    /// The server closed the connection (EOF or reset).
    Closed,
    /// The deadline passed with the connection still open.
    Timeout,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub bytes: Vec<u8>,
    pub end: End,
}

/// A blocking client. Every read and write has a deadline, so a test can
/// not hang on a server that stops answering.
#[derive(Debug)]
pub struct Client {
    stream: TcpStream,
    addr: String,
    deadline: Duration,
    sentinel_ready: bool,
}

impl Client {
    pub fn connect(addr: &str) -> Client {
        let sa = resolve(addr);
        let stream = TcpStream::connect_timeout(&sa, IO_DEADLINE)
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_nodelay(true).expect("TCP_NODELAY");
        stream
            .set_write_timeout(Some(IO_DEADLINE))
            .expect("write timeout");
        Client {
            stream,
            addr: addr.to_string(),
            deadline: IO_DEADLINE,
            sentinel_ready: false,
        }
    }

    /// Connects and stores the sentinel item through this connection, so
    /// that `exchange` can tell where replies end.
    pub fn with_sentinel(addr: &str) -> Client {
        let mut c = Client::connect(addr);
        c.store_sentinel();
        c
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn set_deadline(&mut self, d: Duration) {
        self.deadline = d;
    }

    fn sentinel_set_request() -> Vec<u8> {
        format!(
            "set {SENTINEL_KEY} 0 0 {}\r\n{SENTINEL_VALUE}\r\n",
            SENTINEL_VALUE.len()
        )
        .into_bytes()
    }

    fn sentinel_get_request() -> Vec<u8> {
        format!("get {SENTINEL_KEY}\r\n").into_bytes()
    }

    fn sentinel_reply() -> Vec<u8> {
        format!(
            "VALUE {SENTINEL_KEY} 0 {}\r\n{SENTINEL_VALUE}\r\nEND\r\n",
            SENTINEL_VALUE.len()
        )
        .into_bytes()
    }

    /// (Re)stores the sentinel item; panics if the server does not say STORED.
    pub fn store_sentinel(&mut self) {
        let r = self.send_and_read(&[&Self::sentinel_set_request()], |b| b.ends_with(b"\r\n"));
        assert!(
            r.bytes == b"STORED\r\n",
            "storing the sentinel on {} failed: {:?} {}",
            self.addr,
            r.end,
            escape(&r.bytes)
        );
        self.sentinel_ready = true;
    }

    /// Sends `req` then the sentinel `get`, and returns exactly the reply
    /// bytes to `req` (sentinel stripped), or what came before the server
    /// closed the connection / the deadline passed.
    ///
    /// The request and the sentinel `get` go out in one write, as a client
    /// that pipelines everything and then waits would send them: a server
    /// that only makes progress when more bytes arrive must not be rescued
    /// by a later sentinel write.
    pub fn exchange(&mut self, req: &[u8]) -> Reply {
        assert!(self.sentinel_ready, "exchange needs Client::with_sentinel");
        let mut all = req.to_vec();
        all.extend_from_slice(&Self::sentinel_get_request());
        let tail = Self::sentinel_reply();
        let r = self.send_and_read(&[&all], |b| b.ends_with(&tail));
        Self::finish_sentinel(r)
    }

    /// Like `exchange`, with the request sent as separate writes (the
    /// sentinel `get` in a write of its own).
    pub fn exchange_split(&mut self, chunks: &[&[u8]]) -> Reply {
        assert!(self.sentinel_ready, "exchange needs Client::with_sentinel");
        let get = Self::sentinel_get_request();
        let mut all: Vec<&[u8]> = chunks.to_vec();
        all.push(&get);
        let tail = Self::sentinel_reply();
        let r = self.send_and_read(&all, |b| b.ends_with(&tail));
        Self::finish_sentinel(r)
    }

    /// Like `exchange`, but stores the sentinel again after `req` (for
    /// requests such as flush_all that remove it). The extra `STORED` is
    /// stripped as well.
    pub fn exchange_resentinel(&mut self, req: &[u8]) -> Reply {
        let set = Self::sentinel_set_request();
        let get = Self::sentinel_get_request();
        let mut tail = b"STORED\r\n".to_vec();
        tail.extend_from_slice(&Self::sentinel_reply());
        let all = [req, &set, &get].concat();
        let r = self.send_and_read(&[&all], |b| b.ends_with(&tail));
        if r.end == End::Complete {
            let n = r.bytes.len() - tail.len();
            Reply {
                bytes: r.bytes[..n].to_vec(),
                end: End::Complete,
            }
        } else {
            r
        }
    }

    fn finish_sentinel(r: Reply) -> Reply {
        if r.end == End::Complete {
            let n = r.bytes.len() - Self::sentinel_reply().len();
            Reply {
                bytes: r.bytes[..n].to_vec(),
                end: End::Complete,
            }
        } else {
            r
        }
    }

    /// Sends `req` (no sentinel) and reads until the server closes the
    /// connection or the deadline passes.
    pub fn send_until_close(&mut self, req: &[u8]) -> Reply {
        self.send_and_read(&[req], |_| false)
    }

    /// Sends `req` (no sentinel) and reads until `done(reply so far)`.
    pub fn send_until(&mut self, req: &[u8], done: impl Fn(&[u8]) -> bool) -> Reply {
        self.send_and_read(&[req], done)
    }

    /// Writes raw bytes (one write, flushed). No reading.
    pub fn write_raw(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("write to {}: {e}", self.addr));
        self.stream.flush().expect("flush");
    }

    /// Reads until `done(reply so far)`, EOF, or the deadline.
    pub fn read_until(&mut self, done: impl Fn(&[u8]) -> bool) -> Reply {
        self.send_and_read(&[], done)
    }

    /// Half-closes the write side (the server sees EOF).
    pub fn shutdown_write(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// Writes the chunks as separate writes (TCP_NODELAY, flushed; a short
    /// pause between chunks makes separate segments likely, but nothing
    /// depends on it) on a helper thread, while this thread reads until
    /// `done`, EOF or the deadline. Writing and reading concurrently means a
    /// large request can never deadlock against a large reply.
    fn send_and_read(&mut self, chunks: &[&[u8]], done: impl Fn(&[u8]) -> bool) -> Reply {
        let end_at = Instant::now() + self.deadline;
        let mut writer = self.stream.try_clone().expect("clone stream");
        let owned: Vec<Vec<u8>> = chunks.iter().map(|c| c.to_vec()).collect();
        thread::scope(|scope| {
            let w = scope.spawn(move || {
                let n = owned.len();
                for (i, c) in owned.iter().enumerate() {
                    if writer.write_all(c).and_then(|_| writer.flush()).is_err() {
                        // The server closed the connection; the reader sees it.
                        return;
                    }
                    if i + 1 < n {
                        thread::sleep(Duration::from_millis(1));
                    }
                }
            });
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 64 * 1024];
            let end = loop {
                if !buf.is_empty() && done(&buf) {
                    break End::Complete;
                }
                let now = Instant::now();
                if now >= end_at {
                    break End::Timeout;
                }
                self.stream
                    .set_read_timeout(Some(end_at - now))
                    .expect("read timeout");
                match self.stream.read(&mut chunk) {
                    Ok(0) => break End::Closed,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        break End::Timeout
                    }
                    // Reset / aborted: the server closed with data unread.
                    Err(_) => break End::Closed,
                }
            };
            if end == End::Timeout && !w.is_finished() {
                // Unblock a writer stuck on a server that stopped reading
                // (the connection is then half-closed). Otherwise the
                // connection stays usable after a timeout.
                let _ = self.stream.shutdown(Shutdown::Write);
            }
            let _ = w.join();
            Reply { bytes: buf, end }
        })
    }
}

/// Reads `get`-style replies: true once `buf` holds a complete reply that
/// ends with `END\r\n` (data blocks are skipped by their length) or an error
/// line.
pub fn complete_retrieval(buf: &[u8]) -> bool {
    let mut pos = 0;
    loop {
        let Some(nl) = buf[pos..].windows(2).position(|w| w == b"\r\n") else {
            return false;
        };
        let line = &buf[pos..pos + nl];
        pos += nl + 2;
        if line == b"END" {
            return pos == buf.len();
        }
        if let Some(rest) = line.strip_prefix(b"VALUE ") {
            let toks: Vec<&[u8]> = rest.split(|&c| c == b' ').collect();
            let Some(len) = toks
                .get(2)
                .and_then(|t| std::str::from_utf8(t).ok())
                .and_then(|t| t.parse::<usize>().ok())
            else {
                return true; // malformed: let the caller compare it
            };
            pos += len + 2;
            if pos > buf.len() {
                return false;
            }
        } else {
            return pos == buf.len(); // an error line
        }
    }
}

// ---------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------

/// A file in the temporary directory, with the given contents and mode,
/// removed on drop.
#[derive(Debug)]
pub struct TempFile {
    path: std::path::PathBuf,
}

impl TempFile {
    pub fn new(name: &str, contents: &[u8], mode: u32) -> TempFile {
        use std::os::unix::fs::PermissionsExt;
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("memrelay-test-{}-{n}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {path:?}: {e}"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {path:?}: {e}"));
        TempFile { path }
    }

    pub fn path(&self) -> &str {
        self.path.to_str().expect("temporary paths are UTF-8")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

// ---------------------------------------------------------------------------
// memcached's meta get, read straight from a server
// ---------------------------------------------------------------------------

/// One complete meta reply: a line, or `VA <len> ...` and its data block.
pub fn meta_done(b: &[u8]) -> bool {
    let Some(nl) = b.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    if !b.starts_with(b"VA ") {
        return b.len() == nl + 2;
    }
    let head = String::from_utf8_lossy(&b[..nl]);
    let len: usize = head
        .split(' ')
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    b.len() >= nl + 2 + len + 2
}

/// An item as memcached holds it: value, client flags, TTL (-1: none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub value: String,
    pub flags: u32,
    pub ttl: i64,
}

pub fn same_item(a: &Option<Item>, b: &Option<Item>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.value == b.value
                && a.flags == b.flags
                && (a.ttl == b.ttl || (a.ttl >= 0 && b.ttl >= 0 && (a.ttl - b.ttl).abs() <= 2))
        }
        _ => false,
    }
}

pub fn parse_mg(b: &[u8]) -> Result<Option<Item>, String> {
    if b == b"EN\r\n" {
        return Ok(None);
    }
    let nl = b
        .windows(2)
        .position(|w| w == b"\r\n")
        .ok_or_else(|| format!("no line: {}", escape(b)))?;
    let head = String::from_utf8_lossy(&b[..nl]).into_owned();
    let toks: Vec<&str> = head.split(' ').collect();
    if toks.first() != Some(&"VA") {
        return Err(format!("unexpected mg reply: {}", escape(b)));
    }
    let len: usize = toks[1].parse().map_err(|_| format!("bad len: {head}"))?;
    let (mut flags, mut ttl) = (0, -1);
    for t in &toks[2..] {
        if let Some(f) = t.strip_prefix('f') {
            flags = f.parse().map_err(|_| format!("bad flags: {head}"))?;
        } else if let Some(v) = t.strip_prefix('t') {
            ttl = v.parse().map_err(|_| format!("bad ttl: {head}"))?;
        }
    }
    let value = String::from_utf8_lossy(&b[nl + 2..nl + 2 + len]).into_owned();
    Ok(Some(Item { value, flags, ttl }))
}

/// Keys that land on every one of `servers` (checked on the servers
/// themselves after a set through the proxy).
pub fn set_spread(proxy: &str, servers: &[&Memcached], n: usize) -> Vec<String> {
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
