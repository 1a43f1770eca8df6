//! A real memcached on a loopback port the kit picks, that a test or a tool
//! kills, restarts on the same port (empty), stops and resumes; SIGKILLed
//! and reaped when dropped.
//!
//! Two faces: `start`, `restart`, `stop`... fail the test when something
//! goes wrong (tests); `launch`, `try_restart`, `try_stop`... return the
//! reason (memrelay-chaos, which reports it and exits).

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::client::Client;
use crate::process::{
    is_root, join_host_port, kill_and_reap, listens_on, must_signal, proc_state, register, resolve,
    try_free_port, wait_until, Output, START_DEADLINE,
};

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

/// A memcached server on a loopback port; SIGKILLed and reaped on drop.
#[derive(Debug)]
pub struct Memcached {
    child: Option<Child>,
    bin: String,
    host: String,
    port: u16,
    /// Arguments beyond the kit's own (kept for restarts).
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
        Memcached::launch(&memcached_bin(), host, extra).unwrap_or_else(|e| panic!("{e}"))
    }

    /// memcached `bin` on `host` with `extra` arguments, on a free port
    /// (another one if a process took it first); Err says why not.
    pub fn launch(bin: &str, host: &str, extra: &[&str]) -> Result<Memcached, String> {
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = try_free_port(host)?;
            match spawn(bin, host, port, &extra) {
                Ok(child) => {
                    return Ok(Memcached {
                        child: Some(child),
                        bin: bin.to_string(),
                        host: host.to_string(),
                        port,
                        extra,
                    });
                }
                Err(e) => last_err = e,
            }
        }
        Err(format!("could not start memcached on {host}: {last_err}"))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// "127.0.0.1:PORT" or "[::1]:PORT".
    pub fn addr(&self) -> String {
        join_host_port(&self.host, self.port)
    }

    pub fn pid(&self) -> u32 {
        self.try_pid().unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_pid(&self) -> Result<u32, String> {
        self.child
            .as_ref()
            .map(Child::id)
            .ok_or_else(|| format!("memcached on {} is not running", self.addr()))
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
    pub fn try_restart(&mut self) -> Result<(), String> {
        self.kill();
        let end = Instant::now() + START_DEADLINE;
        loop {
            match spawn(&self.bin, &self.host, self.port, &self.extra) {
                Ok(child) => {
                    self.child = Some(child);
                    return Ok(());
                }
                Err(e) if Instant::now() >= end => {
                    return Err(format!(
                        "could not restart memcached on {}: {e}",
                        self.addr()
                    ))
                }
                // The port may linger a moment after the kill.
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    pub fn restart(&mut self) {
        self.try_restart().unwrap_or_else(|e| panic!("{e}"));
    }

    /// SIGSTOP: the server keeps its socket but stops answering. Waits
    /// until the kernel shows the process stopped: the signal is
    /// asynchronous, and a request sent right after it could otherwise
    /// still be answered.
    pub fn try_stop(&mut self) -> Result<(), String> {
        let pid = self.try_pid()?;
        must_signal(pid, libc::SIGSTOP);
        if wait_until(START_DEADLINE, || proc_state(pid) == Some('T')) {
            Ok(())
        } else {
            Err(format!("memcached {pid} never showed as stopped"))
        }
    }

    pub fn stop(&mut self) {
        self.try_stop().unwrap_or_else(|e| panic!("{e}"));
    }

    /// SIGCONT: resume after `stop`, and wait until it runs again.
    pub fn try_cont(&mut self) -> Result<(), String> {
        let pid = self.try_pid()?;
        must_signal(pid, libc::SIGCONT);
        if wait_until(START_DEADLINE, || proc_state(pid) != Some('T')) {
            Ok(())
        } else {
            Err(format!("memcached {pid} never resumed"))
        }
    }

    pub fn cont(&mut self) {
        self.try_cont().unwrap_or_else(|e| panic!("{e}"));
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
fn spawn(bin: &str, host: &str, port: u16, extra: &[String]) -> Result<Child, String> {
    let mut cmd = Command::new(bin);
    cmd.args(["-U", "0", "-l", host, "-p", &port.to_string()])
        .args(["-t", "1", "-m", "64"]);
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
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(format!(
                "cannot run {bin}: {e}. A real memcached is needed: install it \
                 (e.g. `apt-get install memcached`)."
            ))
        }
        Err(e) => return Err(format!("cannot run {bin}: {e}")),
    };
    register(child.id());
    let log = Output::new(None);
    if let Some(err) = child.stderr.take() {
        log.drain(err, None);
    }
    let addr = join_host_port(host, port);
    let end = Instant::now() + START_DEADLINE;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            crate::process::reaped(&child);
            log.settle(Duration::from_secs(1));
            return Err(format!(
                "memcached exited early ({status}): {}",
                log.text().trim()
            ));
        }
        // A memcached speaking TLS (-Z) would take `version` for a broken
        // handshake: for it, an accepted connection is the sign of life
        // (the kernel queues connections once memcached listens).
        let up = if extra.iter().any(|a| a == "-Z") {
            TcpStream::connect_timeout(&resolve(&addr), Duration::from_millis(500)).is_ok()
        } else {
            answers(&addr)
        };
        // Still ours? (Another process could own the port; ours then
        // exits once its bind fails.)
        if up && listens_on(child.id(), port) {
            return Ok(child);
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
