//! Child processes and waiting: the registry of every process the kit
//! started, signals, free loopback ports, polling a condition with a
//! deadline, captured output, and temporary files.
//!
//! Every child's pid is kept in a registry so that a panic in a tool built
//! with `panic = "abort"` (where `Drop` does not run) or an early exit can
//! still kill them: see [`kill_all_children`]. Tests do not need it (their
//! guards are dropped while unwinding), but it costs them nothing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long a server may take to start accepting connections.
pub const START_DEADLINE: Duration = Duration::from_secs(10);

static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

pub(crate) fn register(pid: u32) {
    CHILDREN.lock().unwrap_or_else(|p| p.into_inner()).push(pid);
}

fn unregister(pid: u32) {
    CHILDREN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|p| *p != pid);
}

/// SIGKILLs every child the kit started that is still registered (for a
/// tool's panic hook and signal exits; guards stop theirs one by one).
pub fn kill_all_children() {
    let pids = CHILDREN.lock().unwrap_or_else(|p| p.into_inner()).clone();
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

/// `signal`, failing the test when kill(2) fails.
pub(crate) fn must_signal(pid: u32, sig: libc::c_int) {
    assert!(
        signal(pid, sig),
        "kill({pid}, {sig}) failed: {}",
        std::io::Error::last_os_error()
    );
}

/// SIGKILLs a child (which also ends a SIGSTOPped one) and reaps it.
pub(crate) fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
    unregister(child.id());
}

/// Reaps a child that exited by itself.
pub(crate) fn reaped(child: &Child) {
    unregister(child.id());
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// The state letter of a process (`R`, `S`, `T`...), from /proc.
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the parenthesised command name.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Polls `cond` until it returns true or `deadline` elapses; the pause
/// between polls grows from 1 ms to 50 ms.
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
pub fn try_free_port(host: &str) -> Result<u16, String> {
    let l = TcpListener::bind((host, 0)).map_err(|e| format!("bind {host}:0: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("local_addr: {e}"))
}

/// `try_free_port`, failing the test if none can be had.
pub fn free_port(host: &str) -> u16 {
    try_free_port(host).unwrap_or_else(|e| panic!("{e}"))
}

/// `host:port`, with brackets for IPv6 literals.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

pub(crate) fn resolve(addr: &str) -> SocketAddr {
    addr.to_socket_addrs()
        .unwrap_or_else(|e| panic!("resolve {addr}: {e}"))
        .next()
        .unwrap_or_else(|| panic!("{addr} resolved to nothing"))
}

pub(crate) fn can_connect(addr: &str) -> bool {
    match TcpStream::connect_timeout(&resolve(addr), Duration::from_millis(500)) {
        // Connecting over and over to a free port of the ephemeral range
        // can get that very port as the source, and Linux then connects
        // the socket to itself: nothing listens there.
        Ok(s) => s.local_addr().ok() != s.peer_addr().ok(),
        Err(_) => false,
    }
}

/// Whether process `pid` itself holds a socket listening on `port`. A
/// connection that succeeds proves only that *someone* listens: a process
/// of another test may own the port the kit picked, while ours, which
/// failed to bind it, has not exited yet. Linux only (/proc).
pub(crate) fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let inodes: Vec<String> = fds
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().into_owned();
            let inode = link.strip_prefix("socket:[")?.strip_suffix(']')?;
            Some(inode.to_string())
        })
        .collect();
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        let Ok(text) = std::fs::read_to_string(table) else {
            return false;
        };
        text.lines().skip(1).any(|line| {
            // sl local_address rem_address st ... uid timeout inode
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (cols.get(1), cols.get(3), cols.get(9))
            else {
                return false;
            };
            let listening = *state == "0A";
            let on_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                == Some(port);
            listening && on_port && inodes.iter().any(|i| i == inode)
        })
    })
}

/// A child's output, collected by drain threads. `keep` bounds what is
/// kept (the oldest bytes go first) for processes that run for minutes.
#[derive(Debug, Clone)]
pub(crate) struct Output {
    buf: Arc<Mutex<Vec<u8>>>,
    keep: Option<usize>,
}

/// Where a drain copies its lines as well, each prefixed with the
/// milliseconds since `origin` (a tool's run log).
#[derive(Debug)]
pub(crate) struct Tee {
    /// Opened for appending.
    pub(crate) file: std::fs::File,
    pub(crate) origin: Instant,
    /// Put after the milliseconds (which process wrote the line).
    pub(crate) tag: String,
}

impl Output {
    pub(crate) fn new(keep: Option<usize>) -> Output {
        Output {
            buf: Arc::new(Mutex::new(Vec::new())),
            keep,
        }
    }

    fn push(&self, bytes: &[u8]) {
        let mut b = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        b.extend_from_slice(bytes);
        if let Some(keep) = self.keep {
            if b.len() > keep {
                let cut = b.len() - keep;
                b.drain(..cut);
            }
        }
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    /// Waits (at most `deadline`) until no drain thread holds the buffer:
    /// the pipes are closed and everything written is in.
    pub(crate) fn settle(&self, deadline: Duration) {
        wait_until(deadline, || Arc::strong_count(&self.buf) == 1);
    }

    /// Reads `pipe` into the buffer until EOF, on a thread; with a tee,
    /// also writes each complete line there.
    pub(crate) fn drain(&self, mut pipe: impl Read + Send + 'static, mut tee: Option<Tee>) {
        let out = self.clone();
        thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            let mut partial = Vec::new();
            loop {
                let n = match pipe.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                out.push(&chunk[..n]);
                if let Some(t) = tee.as_mut() {
                    partial.extend_from_slice(&chunk[..n]);
                    while let Some(i) = partial.iter().position(|&c| c == b'\n') {
                        let line: Vec<u8> = partial.drain(..=i).collect();
                        let ms = t.origin.elapsed().as_millis();
                        // One write per line: an O_APPEND write lands
                        // whole, so writers sharing the file interleave
                        // lines, never bytes.
                        let mut stamped = format!("{ms:>8} {}", t.tag).into_bytes();
                        stamped.extend_from_slice(&line);
                        let _ = t.file.write_all(&stamped);
                    }
                }
            }
        });
    }
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
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {dir:?}: {e}"));
        TempDir(dir)
    }

    /// Where `name` in the directory is.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `text` to `name` in the directory and returns its path.
    pub fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap_or_else(|e| panic!("write {p:?}: {e}"));
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A file in the temporary directory, with the given contents and mode,
/// removed on drop.
#[derive(Debug)]
pub struct TempFile {
    path: PathBuf,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_is_ours_only_while_we_listen_on_it() {
        let me = std::process::id();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(listens_on(me, port), "we listen on {port}");
        // A connected socket on the port is not a listener.
        let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let client_port = c.local_addr().unwrap().port();
        assert!(!listens_on(me, client_port), "{client_port} is a client's");
        // Another process's listener (pid 1 holds none of our sockets).
        assert!(!listens_on(1, port), "pid 1 does not own our socket");
        drop(l);
        assert!(!listens_on(me, port), "closed listener");
    }
}
