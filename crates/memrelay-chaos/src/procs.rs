//! The processes the tool runs: memcached servers and one memrelay.
//!
//! Every child's pid is kept in a registry so that a panic (the release
//! profile aborts on panic, so `Drop` does not run) or an early exit still
//! kills them: see [`kill_all_children`].

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long a server gets to start answering.
const START_DEADLINE: Duration = Duration::from_secs(10);

static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn register(pid: u32) {
    if let Ok(mut c) = CHILDREN.lock() {
        c.push(pid);
    }
}

fn unregister(pid: u32) {
    if let Ok(mut c) = CHILDREN.lock() {
        c.retain(|p| *p != pid);
    }
}

/// SIGKILLs every child still registered (for the panic hook and signal
/// exits; the normal path stops them one by one).
pub fn kill_all_children() {
    let pids: Vec<u32> = match CHILDREN.lock() {
        Ok(c) => c.clone(),
        Err(p) => p.into_inner().clone(),
    };
    for pid in pids {
        signal(pid, libc::SIGKILL);
    }
}

/// Sends `sig` to `pid`; false if kill(2) failed.
pub fn signal(pid: u32, sig: libc::c_int) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) == 0 }
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// The state letter of a process (`R`, `S`, `T`...), from /proc.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Polls `cond` until it holds or `deadline` passes.
pub fn wait_until(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// A free TCP port on 127.0.0.1 (the kernel's pick; free when returned).
pub fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("local_addr: {e}"))
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// True when a server on `port` answers `version`.
fn answers_version(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&loopback(port), Duration::from_millis(300)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"version\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 128];
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got.starts_with(b"VERSION ")
}

fn reap(child: &mut Child) {
    let pid = child.id();
    let _ = child.kill(); // SIGKILL ends a stopped process too
    let _ = child.wait();
    unregister(pid);
}

/// One memcached on 127.0.0.1 that can be killed, restarted on the same
/// port (empty), stopped and resumed.
#[derive(Debug)]
pub struct Memcached {
    bin: String,
    port: u16,
    child: Option<Child>,
}

impl Memcached {
    /// Starts memcached on a free port.
    pub fn start(bin: &str) -> Result<Memcached, String> {
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            match spawn_memcached(bin, port) {
                Ok(child) => {
                    return Ok(Memcached {
                        bin: bin.to_string(),
                        port,
                        child: Some(child),
                    })
                }
                Err(e) => last = e,
            }
        }
        Err(format!("could not start memcached ({bin}): {last}"))
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGKILL and reap: the port is closed afterwards, the cache gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            reap(&mut c);
        }
    }

    /// Kill if running, then start again on the same port (empty).
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        let end = Instant::now() + START_DEADLINE;
        loop {
            match spawn_memcached(&self.bin, self.port) {
                Ok(c) => {
                    self.child = Some(c);
                    return Ok(());
                }
                Err(e) if Instant::now() >= end => {
                    return Err(format!(
                        "could not restart memcached on {}: {e}",
                        self.addr()
                    ))
                }
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// SIGSTOP, and wait until the kernel shows it stopped (the signal is
    /// asynchronous).
    pub fn stop(&mut self) -> Result<(), String> {
        let pid = self.pid()?;
        if !signal(pid, libc::SIGSTOP) {
            return Err(format!("SIGSTOP {pid} failed"));
        }
        if wait_until(START_DEADLINE, || proc_state(pid) == Some('T')) {
            Ok(())
        } else {
            Err(format!("memcached {pid} never showed as stopped"))
        }
    }

    /// SIGCONT, and wait until it runs again.
    pub fn cont(&mut self) -> Result<(), String> {
        let pid = self.pid()?;
        if !signal(pid, libc::SIGCONT) {
            return Err(format!("SIGCONT {pid} failed"));
        }
        if wait_until(START_DEADLINE, || proc_state(pid) != Some('T')) {
            Ok(())
        } else {
            Err(format!("memcached {pid} never resumed"))
        }
    }

    fn pid(&self) -> Result<u32, String> {
        self.child
            .as_ref()
            .map(Child::id)
            .ok_or_else(|| format!("memcached on {} is not running", self.addr()))
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn_memcached(bin: &str, port: u16) -> Result<Child, String> {
    let mut cmd = Command::new(bin);
    cmd.args(["-U", "0", "-l", "127.0.0.1", "-p", &port.to_string()])
        .args(["-t", "1", "-m", "64"]);
    if is_root() {
        cmd.args(["-u", "root"]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().map_err(|e| format!("cannot run {bin}: {e}"))?;
    register(child.id());
    let end = Instant::now() + START_DEADLINE;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            unregister(child.id());
            return Err(format!(
                "memcached on port {port} exited at start ({status})"
            ));
        }
        if answers_version(port) {
            // Still ours? Another process could own the port.
            if let Ok(None) = child.try_wait() {
                return Ok(child);
            }
            continue;
        }
        if Instant::now() >= end {
            reap(&mut child);
            return Err(format!(
                "memcached on port {port} not ready in {START_DEADLINE:?}"
            ));
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// The memrelay under test; its stderr is kept (the last lines) for the
/// report.
#[derive(Debug)]
pub struct Memrelay {
    child: Option<Child>,
    port: u16,
    log: Arc<Mutex<Vec<String>>>,
}

/// Lines of memrelay's log kept for the report.
const LOG_LINES: usize = 400;

impl Memrelay {
    /// `log_file`: where all of memrelay's log goes too, each line prefixed
    /// with the milliseconds since `origin`.
    /// `port`: the port to listen on (a restart keeps it), or None for a
    /// free one; the log file is appended to when a port is given.
    pub fn start(
        bin: &str,
        args: &[String],
        origin: Instant,
        log_file: Option<&std::path::Path>,
        port: Option<u16>,
    ) -> Result<Memrelay, String> {
        let restart = port.is_some();
        let port = match port {
            Some(p) => p,
            None => free_port()?,
        };
        let mut file = match log_file {
            Some(p) => Some(std::io::LineWriter::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .append(restart)
                    .truncate(!restart)
                    .open(p)
                    .map_err(|e| format!("{}: {e}", p.display()))?,
            )),
            None => None,
        };
        let mut child = Command::new(bin)
            .args(["-l", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {bin}: {e}"))?;
        register(child.id());
        let log = Arc::new(Mutex::new(Vec::new()));
        if let Some(err) = child.stderr.take() {
            let log = Arc::clone(&log);
            thread::spawn(move || {
                for line in BufReader::new(err).lines() {
                    let Ok(line) = line else { break };
                    if let Some(f) = file.as_mut() {
                        let _ = writeln!(f, "{:>8} {line}", origin.elapsed().as_millis());
                    }
                    if let Ok(mut l) = log.lock() {
                        if l.len() == LOG_LINES {
                            l.remove(0);
                        }
                        l.push(line);
                    }
                }
            });
        }
        let mut relay = Memrelay {
            child: Some(child),
            port,
            log,
        };
        let end = Instant::now() + START_DEADLINE;
        loop {
            if let Some(c) = relay.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    thread::sleep(Duration::from_millis(100));
                    return Err(format!(
                        "memrelay exited at start ({status}):\n{}",
                        relay.log_tail(20)
                    ));
                }
            }
            if TcpStream::connect_timeout(&loopback(port), Duration::from_millis(300)).is_ok() {
                return Ok(relay);
            }
            if Instant::now() >= end {
                return Err(format!("memrelay not accepting on port {port}"));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sends `sig` and waits (at most `grace`) for the process to exit;
    /// SIGKILL after that. True if it exited by itself.
    pub fn signal_and_wait(&mut self, sig: libc::c_int, grace: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        signal(c.id(), sig);
        let end = Instant::now() + grace;
        while Instant::now() < end {
            if let Ok(Some(_)) = c.try_wait() {
                unregister(c.id());
                return true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        reap(&mut c);
        false
    }

    /// Waits (at most `grace`) for the process to exit by itself (after a
    /// hand-off); SIGKILL after that. True if it exited by itself.
    pub fn wait_exit(&mut self, grace: Duration) -> bool {
        self.signal_and_wait(0, grace)
    }

    /// Still running? (Some(status) once it exited.)
    pub fn exited(&mut self) -> Option<String> {
        let c = self.child.as_mut()?;
        match c.try_wait() {
            Ok(Some(s)) => Some(s.to_string()),
            _ => None,
        }
    }

    pub fn log_tail(&self, n: usize) -> String {
        let l = match self.log.lock() {
            Ok(l) => l.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let from = l.len().saturating_sub(n);
        l[from..].join("\n")
    }

    /// SIGINT (memrelay stops at once), then SIGKILL if it has not exited
    /// within `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), libc::SIGINT);
            let end = Instant::now() + grace;
            while Instant::now() < end {
                if let Ok(Some(_)) = c.try_wait() {
                    unregister(c.id());
                    return;
                }
                thread::sleep(Duration::from_millis(10));
            }
            reap(&mut c);
        }
    }
}

impl Drop for Memrelay {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            reap(&mut c);
        }
    }
}
