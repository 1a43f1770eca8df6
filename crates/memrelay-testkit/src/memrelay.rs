//! The memrelay under test, as a process: started on a loopback port the
//! kit picks (or a given one, for a restart in place), its output captured,
//! stopped by signal, SIGKILLed and reaped when dropped.
//!
//! The kit drives the binary; it never links memrelay's code, so what it
//! tests is what an operator runs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::client::Client;
use crate::process::{
    can_connect, join_host_port, kill_and_reap, listens_on, must_signal, reaped, register, signal,
    try_free_port, wait_until, Output, Tee, START_DEADLINE,
};

/// The memrelay binary: `$MEMRELAY_BIN`, else the `memrelay` cargo built
/// next to the running program (an integration test runs from
/// `target/<profile>/deps/`, a tool from `target/<profile>/`), else the
/// newest of `target/{release,debug}/memrelay` (honouring
/// `CARGO_TARGET_DIR`).
pub fn memrelay_bin() -> PathBuf {
    find_memrelay().unwrap_or_else(|| {
        panic!(
            "no memrelay binary found ($MEMRELAY_BIN, next to {:?}, target/{{release,debug}}): \
             build it (cargo build -p memrelay)",
            std::env::current_exe().ok()
        )
    })
}

/// `memrelay_bin`, or None when there is none.
pub fn find_memrelay() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MEMRELAY_BIN") {
        return Some(PathBuf::from(p));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        let profile_dir = if dir.ends_with("deps") {
            dir.parent().map(Path::to_path_buf).unwrap_or(dir)
        } else {
            dir
        };
        let p = profile_dir.join("memrelay");
        if p.is_file() {
            return Some(p);
        }
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    ["release", "debug"]
        .iter()
        .map(|p| target.join(p).join("memrelay"))
        .filter(|p| p.is_file())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
}

/// How to start a memrelay: `Memrelay::cmd(args)`, then the options, then
/// `start` (fails the test) or `try_start` (returns why not).
#[derive(Debug)]
pub struct MemrelayCmd {
    bin: Option<PathBuf>,
    /// Arguments after `-l 127.0.0.1 -p PORT`.
    args: Vec<String>,
    /// A fixed port (a restart in place); None: a free one, retried when
    /// another process takes it first.
    port: Option<u16>,
    /// memrelay's standard error appended to this file, each line prefixed
    /// with the milliseconds since the instant and the tag (several
    /// memrelays may share one file: each line is one append).
    log_file: Option<(PathBuf, Instant, String)>,
    /// Bytes of output kept (None: all).
    keep: Option<usize>,
}

impl MemrelayCmd {
    /// The binary to run (default: `memrelay_bin()`).
    pub fn bin(mut self, bin: &Path) -> MemrelayCmd {
        self.bin = Some(bin.to_path_buf());
        self
    }

    /// Listen on `port` rather than a free port the kit picks.
    pub fn port(mut self, port: u16) -> MemrelayCmd {
        self.port = Some(port);
        self
    }

    /// Append memrelay's log to `path`, lines stamped with ms since
    /// `origin` and then `tag` (which memrelay of several wrote it).
    pub fn log_file(mut self, path: &Path, origin: Instant, tag: &str) -> MemrelayCmd {
        self.log_file = Some((path.to_path_buf(), origin, tag.to_string()));
        self
    }

    /// Keep only the last `bytes` of output (a run of minutes).
    pub fn keep_last(mut self, bytes: usize) -> MemrelayCmd {
        self.keep = Some(bytes);
        self
    }

    pub fn start(self) -> Memrelay {
        self.try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_start(self) -> Result<Memrelay, String> {
        let bin = self.bin.clone().unwrap_or_else(memrelay_bin);
        let argv = |port: u16| {
            let mut all: Vec<String> = vec!["-l".into(), "127.0.0.1".into(), "-p".into()];
            all.push(port.to_string());
            all.extend(self.args.iter().cloned());
            all
        };
        let tee = || -> Result<Option<Tee>, String> {
            let Some((path, origin, tag)) = &self.log_file else {
                return Ok(None);
            };
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(Some(Tee {
                file: f,
                origin: *origin,
                tag: tag.clone(),
            }))
        };
        match self.port {
            Some(port) => launch(&bin, argv(port), port, tee()?, self.keep).map_err(|e| e.0),
            None => launch_on_free_port(&bin, || {
                let port = try_free_port("127.0.0.1")?;
                Ok((argv(port), port, tee()?, self.keep))
            }),
        }
    }
}

/// A running memrelay; killed on drop. Its stdout and stderr are captured
/// for diagnostics.
#[derive(Debug)]
pub struct Memrelay {
    child: Option<Child>,
    port: u16,
    args: Vec<String>,
    log: Output,
}

/// Why a start failed, and whether another port may do better.
struct Failed(String, Retry);

#[derive(PartialEq)]
enum Retry {
    /// It exited at once: perhaps another process took the port.
    OtherPort,
    /// It runs but never listened: another port would only repeat the wait.
    No,
}

/// What one start attempt is given: argv, port, log copy, bytes kept.
type Attempt = (Vec<String>, u16, Option<Tee>, Option<usize>);

/// Starts memrelay on a free port, on another if it exits at once (a
/// process may take the port between the kit's pick and memrelay's bind).
fn launch_on_free_port(
    bin: &Path,
    mut attempt: impl FnMut() -> Result<Attempt, String>,
) -> Result<Memrelay, String> {
    let mut failures = Vec::new();
    for _ in 0..3 {
        let (argv, port, tee, keep) = attempt()?;
        match launch(bin, argv, port, tee, keep) {
            Ok(m) => return Ok(m),
            Err(Failed(e, Retry::OtherPort)) => failures.push(e),
            Err(Failed(e, Retry::No)) => return Err(e),
        }
    }
    Err(format!(
        "memrelay did not start:\n{}",
        failures.join("\n---\n")
    ))
}

/// Starts `bin argv` and waits (deadline) until `port` accepts connections.
fn launch(
    bin: &Path,
    argv: Vec<String>,
    port: u16,
    tee: Option<Tee>,
    keep: Option<usize>,
) -> Result<Memrelay, Failed> {
    let log = Output::new(keep);
    let mut child = Command::new(bin)
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Failed(format!("cannot run {}: {e}", bin.display()), Retry::No))?;
    register(child.id());
    if let Some(out) = child.stdout.take() {
        log.drain(out, None);
    }
    if let Some(err) = child.stderr.take() {
        log.drain(err, tee);
    }
    let addr = join_host_port("127.0.0.1", port);
    let mut exited = None;
    let ready = wait_until(START_DEADLINE, || {
        if let Ok(Some(st)) = child.try_wait() {
            exited = Some(st);
            return true;
        }
        can_connect(&addr) && listens_on(child.id(), port)
    });
    match (ready, exited) {
        (true, None) => Ok(Memrelay {
            child: Some(child),
            port,
            args: argv,
            log,
        }),
        (_, Some(st)) => {
            reaped(&child);
            // Give the drain threads a moment to collect the last output.
            log.settle(Duration::from_millis(500));
            Err(Failed(
                format!(
                    "memrelay {argv:?} exited early ({st}) on port {port}; output:\n{}",
                    log.text()
                ),
                Retry::OtherPort,
            ))
        }
        (false, None) => {
            kill_and_reap(&mut child);
            Err(Failed(
                format!(
                    "memrelay {argv:?}: port {port} not accepting connections within \
                     {START_DEADLINE:?}; output:\n{}",
                    log.text()
                ),
                Retry::No,
            ))
        }
    }
}

impl Memrelay {
    /// How to start one with `args` after `-l 127.0.0.1 -p PORT`.
    pub fn cmd<S: AsRef<str>>(args: &[S]) -> MemrelayCmd {
        MemrelayCmd {
            bin: None,
            args: args.iter().map(|a| a.as_ref().to_string()).collect(),
            port: None,
            log_file: None,
            keep: None,
        }
    }

    /// Starts memrelay with `args` and waits (deadline) until its port
    /// accepts connections. Panics with its output if it never does.
    pub fn start<S: AsRef<str>>(args: &[S]) -> Memrelay {
        Memrelay::cmd(args).start()
    }

    /// Starts memrelay with exactly the arguments `args(port)` returns for
    /// a free port on 127.0.0.1 (which they must make it listen on, with
    /// flags or a config file), and waits as `start` does.
    pub fn start_with(args: impl Fn(u16) -> Vec<String>) -> Memrelay {
        launch_on_free_port(&memrelay_bin(), || {
            let port = try_free_port("127.0.0.1")?;
            Ok((args(port), port, None, None))
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> String {
        join_host_port("127.0.0.1", self.port)
    }

    /// Every argument it was started with.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// The proxy's process id.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("memrelay is running")
    }

    /// The exit code if the process has exited (reaping it), else None.
    pub fn try_exit(&mut self) -> Option<i32> {
        self.exited().map(|st| st.code().unwrap_or(-1))
    }

    /// Has the process exited (e.g. crashed)? Returns its status if so.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let st = self.child.as_mut()?.try_wait().ok().flatten()?;
        if let Some(c) = self.child.as_ref() {
            reaped(c);
        }
        Some(st)
    }

    /// Everything memrelay wrote to stdout/stderr so far (the last bytes
    /// only, with `keep_last`).
    pub fn output(&self) -> String {
        self.log.text()
    }

    /// The last `n` lines of its output.
    pub fn output_tail(&self, n: usize) -> String {
        let out = self.output();
        let lines: Vec<&str> = out.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_and_reap(&mut c);
        }
    }

    /// SIGTERM, then waits (deadline) for the process to exit; returns its
    /// exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        must_signal(self.pid(), libc::SIGTERM);
        let mut code = None;
        wait_until(Duration::from_secs(15), || {
            code = self.try_exit();
            code.is_some()
        });
        code
    }

    /// Sends `sig` (0: none) and waits at most `grace` for the process to
    /// exit; SIGKILL after that. True if it exited by itself.
    pub fn signal_and_wait(&mut self, sig: libc::c_int, grace: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        if sig != 0 {
            signal(c.id(), sig);
        }
        let end = Instant::now() + grace;
        while Instant::now() < end {
            if let Ok(Some(_)) = c.try_wait() {
                reaped(&c);
                return true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        kill_and_reap(&mut c);
        false
    }

    /// Waits (at most `grace`) for the process to exit by itself (after a
    /// hand-off); SIGKILL after that. True if it exited by itself.
    pub fn wait_exit(&mut self, grace: Duration) -> bool {
        self.signal_and_wait(0, grace)
    }

    /// SIGINT (memrelay stops at once), then SIGKILL if it has not exited
    /// within `grace`.
    pub fn stop(&mut self, grace: Duration) {
        self.signal_and_wait(libc::SIGINT, grace);
    }

    /// SIGHUP: reload the configuration.
    pub fn hangup(&self) {
        must_signal(self.pid(), libc::SIGHUP);
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
    /// Did this memrelay itself listen on `watch_port` while it ran? (Not
    /// whether the port accepted a connection: another test's process may
    /// own a port the kit picked.)
    pub port_was_bound: bool,
}

/// Runs memrelay with exactly `args`, waiting at most `deadline` for it to
/// exit. While it runs, keeps checking whether it listens on `watch_port`
/// (if any).
pub fn run_memrelay<S: AsRef<str>>(
    args: &[S],
    deadline: Duration,
    watch_port: Option<u16>,
) -> RunOutput {
    let bin = memrelay_bin();
    let mut child = Command::new(&bin)
        .args(args.iter().map(|a| a.as_ref()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    register(child.id());
    let (out, err) = (Output::new(None), Output::new(None));
    if let Some(p) = child.stdout.take() {
        out.drain(p, None);
    }
    if let Some(p) = child.stderr.take() {
        err.drain(p, None);
    }
    let mut status = None;
    let mut bound = false;
    wait_until(deadline, || {
        if watch_port.is_some_and(|p| listens_on(child.id(), p)) {
            bound = true;
        }
        if let Ok(Some(st)) = child.try_wait() {
            status = Some(st);
            return true;
        }
        false
    });
    if status.is_none() {
        kill_and_reap(&mut child);
    } else {
        reaped(&child);
    }
    // The pipes close when the process is gone; let the drain threads finish.
    out.settle(Duration::from_secs(2));
    err.settle(Duration::from_secs(2));
    RunOutput {
        status,
        stdout: out.text(),
        stderr: err.text(),
        port_was_bound: bound,
    }
}

/// A memrelay stopped with SIGSTOP: it neither serves nor answers its
/// peers (to the others of a fleet, one cut from them). Resumed when
/// dropped.
#[derive(Debug)]
pub struct Stopped(u32);

impl Stopped {
    pub fn new(r: &Memrelay) -> Stopped {
        assert!(crate::process::signal(r.pid(), libc::SIGSTOP));
        assert!(crate::process::wait_until(crate::CONVERGE, || {
            crate::process::proc_state(r.pid()) == Some('T')
        }));
        Stopped(r.pid())
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        crate::process::signal(self.0, libc::SIGCONT);
    }
}
