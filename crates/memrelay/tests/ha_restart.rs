//! memrelay's own restarts keep what servers missed (`--state-file`): a
//! planned restart (SIGTERM), a crash (SIGKILL) and a hand-off
//! (`--handoff`), each while a primary is stopped after a write went past
//! it. One primary and one backup, real memcached processes.
#![allow(clippy::panic, clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::{
    escape, free_port, stats, wait_until, Client, End, Fault, Forwarder, Memcached, Memrelay,
    TempDir,
};

const CONVERGE: Duration = Duration::from_secs(5);

fn relay_args(primary: &Memcached, backup: &Memcached, state: &Path) -> Vec<String> {
    vec![
        "-s".into(),
        primary.addr(),
        "-b".into(),
        backup.addr(),
        "--timeout".into(),
        "300ms".into(),
        "--connect-timeout".into(),
        "300ms".into(),
        "--failure-limit".into(),
        "1".into(),
        "--shutdown-timeout".into(),
        "1s".into(),
        "-t".into(),
        "2".into(),
        "--state-file".into(),
        state.display().to_string(),
    ]
}

fn exchange(addr: &str, req: &str) -> String {
    let mut c = Client::with_sentinel(addr);
    c.set_deadline(Duration::from_secs(5));
    let r = c.exchange(req.as_bytes());
    assert_eq!(r.end, End::Complete, "{req}: {}", escape(&r.bytes));
    String::from_utf8_lossy(&r.bytes).into_owned()
}

/// Stops the primary, waits until `addr` marks it down, and writes k=v2,
/// which goes to the backup only: the primary keeps v1 and missed v2.
fn write_past_a_stopped_primary(addr: &str, primary: &mut Memcached) {
    assert_eq!(exchange(addr, "set k 0 0 2\r\nv1\r\n"), "STORED\r\n");
    primary.stop();
    let down = wait_until(CONVERGE, || {
        let _ = exchange(addr, "get nudge\r\n");
        stats(addr).get("server:0:state").map(String::as_str) == Some("down")
    });
    assert!(down, "the stopped primary was never marked down");
    assert_eq!(exchange(addr, "set k 0 0 2\r\nv2\r\n"), "STORED\r\n");
}

/// After the primary resumes, the proxy at `addr` serves v2 (or nothing),
/// never v1, from now until the primary was invalidated.
fn never_serves_the_missed_value(addr: &str, primary: &mut Memcached, output: impl Fn() -> String) {
    primary.cont();
    let deadline = std::time::Instant::now() + CONVERGE;
    while std::time::Instant::now() < deadline {
        let r = exchange(addr, "get k\r\n");
        assert!(
            r == "VALUE k 0 2\r\nv2\r\nEND\r\n" || r == "END\r\n",
            "after the restart the proxy serves {r:?}\n{}",
            output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(exchange(addr, "get k\r\n"), "VALUE k 0 2\r\nv2\r\nEND\r\n");
}

#[test]
fn a_planned_restart_keeps_what_servers_missed() {
    let (mut primary, backup) = (Memcached::start(), Memcached::start());
    let dir = TempDir::new("state-term");
    let state = dir.path("state");
    let mut old = Memrelay::start(&relay_args(&primary, &backup, &state));
    write_past_a_stopped_primary(&old.addr(), &mut primary);
    assert_eq!(old.terminate(), Some(0), "{}", old.output());
    let text = std::fs::read_to_string(&state).unwrap();
    assert!(
        text.contains("status clean") && text.contains("key aw=="),
        "{text}"
    );
    let new = Memrelay::start(&relay_args(&primary, &backup, &state));
    never_serves_the_missed_value(&new.addr(), &mut primary, || new.output());
}

#[test]
fn after_a_crash_the_servers_marked_dirty_are_flushed_before_they_serve() {
    let (mut primary, backup) = (Memcached::start(), Memcached::start());
    let dir = TempDir::new("state-kill");
    let state = dir.path("state");
    let mut old = Memrelay::start(&relay_args(&primary, &backup, &state));
    write_past_a_stopped_primary(&old.addr(), &mut primary);
    old.kill();
    let text = std::fs::read_to_string(&state).unwrap();
    assert!(text.contains("status running"), "{text}");
    let new = Memrelay::start(&relay_args(&primary, &backup, &state));
    never_serves_the_missed_value(&new.addr(), &mut primary, || new.output());
    assert!(
        new.output().contains("flushed before it serves"),
        "{}",
        new.output()
    );
}

/// A memrelay on a fixed port (a hand-off keeps the port).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts memrelay on `port` with `--handoff handoff` (taking the sockets
/// over from the memrelay there, if any).
fn spawn_handing_off(port: u16, handoff: &std::path::Path, common: &[String]) -> Proc {
    spawn_with_log(port, handoff, common, None)
}

/// `spawn_handing_off`, its log (debug) written to `log`.
fn spawn_logging(port: u16, handoff: &Path, common: &[String], log: &Path) -> Proc {
    spawn_with_log(port, handoff, common, Some(log))
}

fn spawn_with_log(port: u16, handoff: &Path, common: &[String], log: Option<&Path>) -> Proc {
    let mut args = vec![
        "-l".to_string(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
        "--handoff".into(),
        handoff.display().to_string(),
    ];
    args.extend(common.iter().cloned());
    let mut cmd = Command::new(support::memrelay_bin());
    cmd.args(&args).stdin(Stdio::null()).stdout(Stdio::null());
    match log {
        Some(path) => cmd
            .env("MEMRELAY_LOG", "debug")
            .stderr(std::fs::File::create(path).unwrap()),
        None => cmd.stderr(Stdio::null()),
    };
    Proc(cmd.spawn().unwrap())
}

#[test]
fn a_hand_off_passes_what_servers_missed_to_the_new_process() {
    let (mut primary, backup) = (Memcached::start(), Memcached::start());
    let dir = TempDir::new("state-handoff");
    let state = dir.path("state");
    let handoff = dir.path("handoff.sock");
    let port = free_port("127.0.0.1");
    let addr = format!("127.0.0.1:{port}");
    // /metrics too: its port is handed over with the others.
    let metrics = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let mut common = relay_args(&primary, &backup, &state);
    common.extend(["--metrics".to_string(), metrics.clone()]);
    let spawn = || spawn_handing_off(port, &handoff, &common);
    let mut old = spawn();
    assert!(wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(&addr).is_ok() && handoff.exists()
    }));
    write_past_a_stopped_primary(&addr, &mut primary);
    let _new = spawn();
    let old_exited = wait_until(Duration::from_secs(15), || {
        matches!(old.0.try_wait(), Ok(Some(_)))
    });
    assert!(old_exited, "the old memrelay never drained");
    assert_eq!(
        support::http_get(&metrics, "/healthz").0,
        200,
        "the new memrelay serves no /metrics"
    );
    never_serves_the_missed_value(&addr, &mut primary, String::new);
}

/// While the old process of a hand-off drains, it still serves the clients
/// it had; a key the new process saw a server miss must not be read there
/// from that server. The old process is given a long `--timeout`, so it
/// never sees the primary stop: to it, the primary is up throughout, and
/// only what the new one tells it keeps it from serving v1.
#[test]
fn the_draining_process_learns_what_the_new_one_saw_a_server_miss() {
    let (mut primary, backup) = (Memcached::start(), Memcached::start());
    let dir = TempDir::new("state-handoff-back");
    let state = dir.path("state");
    let handoff = dir.path("handoff.sock");
    let port = free_port("127.0.0.1");
    let addr = format!("127.0.0.1:{port}");
    let with_timeout = |t: &str| {
        let mut args = relay_args(&primary, &backup, &state);
        args.extend(["--timeout".to_string(), t.into()]);
        args
    };
    let mut old = spawn_handing_off(port, &handoff, &with_timeout("5s"));
    assert!(wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(&addr).is_ok() && handoff.exists()
    }));
    let old_pid = old.0.id().to_string();
    // A client of the old process, kept busy so that its drain keeps
    // serving it (a quiet one would be closed).
    let client = std::sync::Arc::new(std::sync::Mutex::new(Client::with_sentinel(&addr)));
    let r = client
        .lock()
        .unwrap()
        .exchange(b"set k 0 0 2\r\nv1\r\nstats\r\n");
    let text = String::from_utf8_lossy(&r.bytes).into_owned();
    assert!(text.starts_with("STORED\r\n"), "{text}");
    assert!(text.contains(&format!("STAT pid {old_pid}\r\n")), "{text}");
    let busy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let keeper = {
        let (client, busy) = (client.clone(), busy.clone());
        std::thread::spawn(move || {
            while busy.load(std::sync::atomic::Ordering::Relaxed) {
                let r = client.lock().unwrap().exchange(b"version\r\n");
                assert!(r.bytes.starts_with(b"VERSION "), "{}", escape(&r.bytes));
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let new = spawn_handing_off(port, &handoff, &with_timeout("150ms"));
    let new_pid = new.0.id().to_string();
    let served_by_new = wait_until(Duration::from_secs(10), || {
        stats(&addr).get("pid") == Some(&new_pid)
    });
    assert!(served_by_new, "the new memrelay never served");
    // The new process sees the primary stop, and writes v2 past it.
    primary.stop();
    let down = wait_until(CONVERGE, || {
        let _ = exchange(&addr, "get nudge\r\n");
        stats(&addr).get("server:0:state").map(String::as_str) == Some("down")
    });
    assert!(down, "the new memrelay never marked the primary down");
    assert_eq!(exchange(&addr, "set k 0 0 2\r\nv2\r\n"), "STORED\r\n");
    primary.cont();
    // At once, before the new process invalidates k on the primary.
    let r = client.lock().unwrap().exchange(b"get k\r\n");
    busy.store(false, std::sync::atomic::Ordering::Relaxed);
    keeper.join().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&r.bytes),
        "VALUE k 0 2\r\nv2\r\nEND\r\n",
        "the draining memrelay served the value the primary missed"
    );
    let old_exited = wait_until(Duration::from_secs(15), || {
        matches!(old.0.try_wait(), Ok(Some(_)))
    });
    assert!(old_exited, "the old memrelay never drained");
}

/// `relay_args`, with the backup at `backup` (a forwarder to it) and the
/// given `--timeout`.
fn relay_args_via(primary: &Memcached, backup: &str, timeout: &str, state: &Path) -> Vec<String> {
    let mut args = relay_args(primary, primary, state);
    args[3] = backup.to_string();
    args.extend(
        [
            "--timeout",
            timeout,
            "--shutdown-timeout",
            "30s",
            "--write-timeout",
            "30s",
        ]
        .map(String::from),
    );
    args
}

/// A memcached `stats` figure of the server at `addr`.
fn server_stat(addr: &str, name: &str) -> u64 {
    let text = exchange(addr, "stats\r\n");
    let prefix = format!("STAT {name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// A client of the draining process that asked for 20 MB and reads none
/// of it: the process keeps draining (it owes the reply) until `release`.
struct Stalled(std::net::TcpStream);

impl Stalled {
    fn start(addr: &str) -> Stalled {
        let big = "x".repeat(500_000);
        assert_eq!(
            exchange(addr, &format!("set big 0 0 {}\r\n{big}\r\n", big.len())),
            "STORED\r\n"
        );
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        std::io::Write::write_all(&mut s, format!("get{}\r\n", " big".repeat(40)).as_bytes())
            .unwrap();
        Stalled(s)
    }

    /// Reads the reply: the old process can finish its drain.
    fn release(mut self) {
        self.0
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut self.0, &mut sink);
    }
}

/// Two processes of a hand-off, both reaching the backup through `link`.
/// The old one listed k for the backup (a write of it failed there at
/// once) and would delete it there only after its settle period, 2 s
/// (`--timeout 2s`); the new one, which saw no failure, has deleted k on
/// the backup at once. A stalled client keeps the old one draining.
struct HandedOff {
    primary: Memcached,
    backup: Memcached,
    addr: String,
    old: Proc,
    old_log: std::path::PathBuf,
    new_log: std::path::PathBuf,
    stalled: Stalled,
    _new: Proc,
    _link: Forwarder,
    _dir: TempDir,
}

fn hand_off_with_k_listed(name: &str) -> HandedOff {
    let (primary, backup) = (Memcached::start(), Memcached::start());
    let link = Forwarder::start(&backup.addr());
    let dir = TempDir::new(name);
    let state = dir.path("state");
    let handoff = dir.path("handoff.sock");
    let (old_log, new_log) = (dir.path("old.log"), dir.path("new.log"));
    let port = free_port("127.0.0.1");
    let addr = format!("127.0.0.1:{port}");
    let old_args = relay_args_via(&primary, &link.addr(), "2s", &state);
    let old = spawn_logging(port, &handoff, &old_args, &old_log);
    assert!(wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(&addr).is_ok() && handoff.exists()
    }));
    assert_eq!(exchange(&addr, "set k 0 0 2\r\nv1\r\n"), "STORED\r\n");
    link.set(Fault::Reset);
    assert_eq!(exchange(&addr, "set k 0 0 2\r\nv2\r\n"), "STORED\r\n");
    link.set(Fault::Pass);
    let listed = stats(&addr).get("server:1:missed_keys").cloned();
    assert!(
        listed.as_deref().is_some_and(|n| n != "0"),
        "k was not recorded as missed on the backup: {listed:?}"
    );
    let stalled = Stalled::start(&addr);
    let new_args = relay_args_via(&primary, &link.addr(), "300ms", &state);
    let new = spawn_logging(port, &handoff, &new_args, &new_log);
    let new_pid = new.0.id().to_string();
    let took_over = wait_until(Duration::from_secs(10), || {
        let s = stats(&addr);
        s.get("pid") == Some(&new_pid) && s.get("server:1:invalidated").is_some_and(|n| n != "0")
    });
    assert!(
        took_over,
        "the new memrelay never served, or never deleted k on the backup\n{}",
        std::fs::read_to_string(&new_log).unwrap_or_default()
    );
    HandedOff {
        primary,
        backup,
        addr,
        old,
        old_log,
        new_log,
        stalled,
        _new: new,
        _link: link,
        _dir: dir,
    }
}

impl HandedOff {
    fn old_log(&self) -> String {
        std::fs::read_to_string(&self.old_log).unwrap_or_default()
    }

    /// Lets the old process finish its drain, and waits for it to exit.
    fn finish(mut self) {
        self.stalled.release();
        let old = &mut self.old;
        let exited = wait_until(Duration::from_secs(15), || {
            matches!(old.0.try_wait(), Ok(Some(_)))
        });
        assert!(exited, "the old memrelay never drained");
    }
}

/// The draining process of a hand-off deletes no missed key: the new one
/// does. After the new one deleted k on the backup, it loses the primary
/// and writes k to the backup alone. A delete from the old process, sent
/// once its settle period ended, would erase the only copy of an
/// acknowledged value.
#[test]
fn the_draining_process_deletes_nothing_the_new_one_may_have_written_since() {
    let mut h = hand_off_with_k_listed("state-handoff-delete");
    h.primary.kill();
    assert_eq!(exchange(&h.addr, "set k 0 0 2\r\nv3\r\n"), "STORED\r\n");
    let deletes = server_stat(&h.backup.addr(), "delete_hits");
    // The old process marks the backup up once it may serve it again:
    // after its delete, if it makes one.
    let looked = wait_until(Duration::from_secs(10), || {
        server_stat(&h.backup.addr(), "delete_hits") > deletes
            || h.old_log().contains("server marked up")
    });
    assert!(
        looked,
        "the old process never looked at the backup again\n{}",
        h.old_log()
    );
    assert_eq!(
        exchange(&h.backup.addr(), "get k\r\n"),
        "VALUE k 0 2\r\nv3\r\nEND\r\n",
        "the draining memrelay deleted the only copy of an acknowledged value"
    );
    assert_eq!(
        exchange(&h.addr, "get k\r\n"),
        "VALUE k 0 2\r\nv3\r\nEND\r\n"
    );
    h.finish();
}

/// The draining process, which deletes nothing, forgets each key the new
/// process deleted on a server (told over the record socket) when it had
/// listed the key before the hand-off: it serves the key from that
/// server again, instead of keeping it off for the rest of its drain.
#[test]
fn the_draining_process_forgets_the_keys_the_new_one_deleted() {
    let h = hand_off_with_k_listed("state-handoff-forget");
    let forgot = wait_until(Duration::from_secs(10), || {
        h.old_log()
            .contains("the new memrelay deleted a key listed here")
    });
    assert!(
        forgot,
        "the old memrelay never heard of the delete\nold:\n{}\nnew:\n{}",
        h.old_log(),
        std::fs::read_to_string(&h.new_log).unwrap_or_default()
    );
    h.finish();
}
