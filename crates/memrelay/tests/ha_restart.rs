//! memrelay's own restarts keep what servers missed (`--state-file`): a
//! planned restart (SIGTERM), a crash (SIGKILL) and a hand-off
//! (`--handoff`), each while a primary is stopped after a write went past
//! it. One primary and one backup, real memcached processes.
#![allow(clippy::panic, clippy::unwrap_used)]

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::{escape, free_port, stats, wait_until, Client, End, Memcached, Memrelay, TempDir};

const CONVERGE: Duration = Duration::from_secs(5);

fn relay_args(primary: &Memcached, backup: &Memcached, state: &PathBuf) -> Vec<String> {
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
    let spawn = || {
        let mut args = vec![
            "-l".to_string(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "--handoff".into(),
            handoff.display().to_string(),
        ];
        args.extend(common.iter().cloned());
        Proc(
            Command::new(support::memrelay_bin())
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
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
