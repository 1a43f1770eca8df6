//! What a memcached operator expects on day one: a port in use refuses the
//! start, the `stats` family answers in memcached's format (and memcached's
//! own tools read it), one version everywhere, logs without colour codes
//! off a terminal, and a daemon that leaves a pid file, a log file and a
//! working hand-off behind. Real memcached behind every proxy.
#![allow(clippy::panic, clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{
    free_port, http_get, memrelay_bin, parse_stats, proc_state, run_memrelay, stats, wait_until,
    Client, Memcached, Memrelay, TempDir, START_DEADLINE,
};

/// The reply to `stats <group>` through `addr`, through its `END` (or its
/// one error line).
fn stats_group(addr: &str, group: &str) -> Vec<u8> {
    let mut c = Client::connect(addr);
    let r = c.send_until(format!("stats {group}\r\n").as_bytes(), |b| {
        b.ends_with(b"END\r\n") || (b.ends_with(b"\r\n") && b.starts_with(b"CLIENT_ERROR"))
    });
    r.bytes
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn a_second_memrelay_on_the_same_port_fails_with_address_in_use() {
    let m = Memcached::start();
    let first = Memrelay::start(&["-t", "1", "-s", &m.addr()]);
    let port = first.port().to_string();
    let second = run_memrelay(
        &["-l", "127.0.0.1", "-p", &port, "-t", "1", "-s", &m.addr()],
        START_DEADLINE,
        None,
    );
    let code = second.status.and_then(|s| s.code());
    assert_eq!(
        code,
        Some(69),
        "the second memrelay must exit 69 (EX_UNAVAILABLE); stderr:\n{}",
        second.stderr
    );
    assert!(
        second.stderr.contains("in use"),
        "no 'address in use' in:\n{}",
        second.stderr
    );
    // The first one still serves every client.
    let mut c = first.client();
    let r = c.send_until(b"get nothing\r\n", |b| b.ends_with(b"END\r\n"));
    assert_eq!(r.bytes, b"END\r\n");
}

#[test]
fn stats_groups_answer_in_memcacheds_format() {
    let p = Memcached::start_with("127.0.0.1", &["-m", "32"]);
    let b = Memcached::start();
    let relay = Memrelay::start(&["-t", "1", "-n", "77", "-s", &p.addr(), "-b", &b.addr()]);
    let mut c = relay.client();
    let r = c.send_until(b"set k 0 0 5\r\nhello\r\n", |b| b.ends_with(b"\r\n"));
    assert_eq!(r.bytes, b"STORED\r\n");

    let settings = parse_stats(&stats_group(&relay.addr(), "settings"));
    assert_eq!(settings.get("maxconns").map(String::as_str), Some("77"));
    assert_eq!(
        settings.get("tcpport"),
        Some(&relay.port().to_string()),
        "{settings:?}"
    );
    assert_eq!(
        settings.get("item_size_max").map(String::as_str),
        Some("1048576")
    );
    // The primary's memory (-m 32), not the backup's too.
    let maxbytes_known = wait_until(START_DEADLINE, || {
        parse_stats(&stats_group(&relay.addr(), "settings"))
            .get("maxbytes")
            .map(String::as_str)
            == Some("33554432")
    });
    assert!(maxbytes_known, "maxbytes never 32 MiB");

    // The servers' figures, as the probers read them: the item shows up.
    let counted = |s: &HashMap<String, String>| {
        s.get("curr_items").map(String::as_str) == Some("1")
            && s.get("server:0:curr_items").map(String::as_str) == Some("1")
            && s.get("server:1:curr_items").map(String::as_str) == Some("1")
            && s.get("limit_maxbytes").map(String::as_str) == Some("33554432")
            && s.contains_key("evictions")
            && s.contains_key("get_expired")
    };
    assert!(
        wait_until(START_DEADLINE, || counted(&stats(&relay.addr()))),
        "capacity figures never right: {:?}",
        stats(&relay.addr())
    );

    let items = wait_until(Duration::from_secs(15), || {
        let s = parse_stats(&stats_group(&relay.addr(), "items"));
        s.get("items:1:number").map(String::as_str) == Some("1")
            && s.get("server:1:items:1:number").map(String::as_str) == Some("1")
    });
    assert!(
        items,
        "stats items never showed the item: {}",
        text(&stats_group(&relay.addr(), "items"))
    );
    let slabs = stats_group(&relay.addr(), "slabs");
    let s = parse_stats(&slabs);
    assert!(
        s.contains_key("1:chunk_size") && s.contains_key("active_slabs"),
        "{}",
        text(&slabs)
    );
    assert!(slabs.ends_with(b"END\r\n"));
    let conns = parse_stats(&stats_group(&relay.addr(), "conns"));
    assert_eq!(
        conns.get("0:addr"),
        Some(&format!("tcp:127.0.0.1:{}", relay.port()))
    );
    assert_eq!(
        conns.get("0:state").map(String::as_str),
        Some("conn_listening")
    );
    // A group memrelay cannot serve is a client error, never a bare ERROR.
    let dump = stats_group(&relay.addr(), "cachedump 1 0");
    assert!(
        dump.starts_with(b"CLIENT_ERROR stats cachedump not supported"),
        "{}",
        text(&dump)
    );
}

#[test]
fn the_metrics_say_what_they_count_and_show_the_servers_figures() {
    let m = Memcached::start();
    let maddr = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let relay = Memrelay::start(&["-t", "1", "-s", &m.addr(), "--metrics", &maddr]);
    let mut c = relay.client();
    let r = c.send_until(b"set k 0 0 1\r\nx\r\n", |b| b.ends_with(b"\r\n"));
    assert_eq!(r.bytes, b"STORED\r\n");
    let item_line = format!(
        "memrelay_server_items{{server=\"{}\",role=\"primary\"}} 1",
        m.addr()
    );
    let seen = wait_until(START_DEADLINE, || {
        http_get(&maddr, "/metrics").1.contains(&item_line)
    });
    let (_, body) = http_get(&maddr, "/metrics");
    assert!(seen, "no {item_line} in:\n{body}");
    assert!(body.contains("memrelay_server_limit_bytes{"), "{body}");
    assert!(
        body.contains("\nmemrelay_connections_accepted_total "),
        "{body}"
    );
    assert!(!body.contains("memrelay_total_connections_total"), "{body}");
    let vague: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("# HELP") && l.contains("See the stats command"))
        .collect();
    assert!(vague.is_empty(), "HELP lines that say nothing: {vague:?}");
}

#[test]
fn one_version_everywhere() {
    let out = Command::new(memrelay_bin())
        .arg("--version")
        .output()
        .unwrap();
    let printed = text(&out.stdout);
    let version = printed
        .trim()
        .strip_prefix("memrelay ")
        .unwrap_or_else(|| panic!("--version printed {printed:?}"))
        .to_string();
    assert!(version.starts_with("1.6.0-memrelay-"), "{version}");
    let m = Memcached::start();
    let relay = Memrelay::start(&["-t", "1", "-s", &m.addr()]);
    let mut c = relay.client();
    let r = c.send_until(b"version\r\n", |b| b.ends_with(b"\r\n"));
    assert_eq!(text(&r.bytes), format!("VERSION {version}\r\n"));
    assert_eq!(stats(&relay.addr()).get("version"), Some(&version));
}

#[test]
fn memcacheds_own_tools_read_memrelays_stats() {
    let m = Memcached::start();
    let relay = Memrelay::start(&["-t", "1", "-s", &m.addr()]);
    match Command::new("memcstat")
        .arg(format!("--servers={}", relay.addr()))
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => {
            let t = text(&out.stdout);
            assert!(out.status.success(), "memcstat failed: {out:?}");
            assert!(t.contains("version: 1.6.0-memrelay-"), "{t}");
            assert!(t.contains("curr_items:"), "{t}");
        }
        Err(e) => skip_or_fail("memcstat (libmemcached-tools)", &e.to_string()),
    }
    let script = format!(
        "from pymemcache.client.base import Client\n\
         c = Client(('127.0.0.1', {}), timeout=5)\n\
         s = c.stats('settings')\n\
         print(s[b'maxconns'], s[b'item_size_max'])\n",
        relay.port()
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(out) if out.status.success() => {
            assert_eq!(text(&out.stdout).trim(), "4096 1048576");
        }
        Ok(out) if text(&out.stderr).contains("No module named 'pymemcache'") => {
            skip_or_fail("pymemcache", "not installed")
        }
        Ok(out) => panic!("pymemcache stats('settings') failed: {}", text(&out.stderr)),
        Err(e) => skip_or_fail("python3", &e.to_string()),
    }
}

/// A client library missing here: fatal where scripts/test installed the
/// clients (MEMRELAY_REQUIRE_CLIENTS=1), a note elsewhere.
fn skip_or_fail(what: &str, why: &str) {
    if std::env::var_os("MEMRELAY_REQUIRE_CLIENTS").is_some() {
        panic!("{what} is required (MEMRELAY_REQUIRE_CLIENTS) but cannot run: {why}");
    }
    eprintln!("note: {what} cannot run here ({why}); that check is skipped");
}

#[test]
fn logs_have_no_colour_codes_off_a_terminal_and_recovery_is_info() {
    let mut m = Memcached::start();
    let relay = Memrelay::start(&["-t", "1", "--failure-limit", "1", "-s", &m.addr()]);
    m.kill();
    let mut c = relay.client();
    let down = wait_until(START_DEADLINE, || {
        let _ = c.send_until(b"get k\r\n", |b| b.ends_with(b"\r\n"));
        relay.output().contains("server marked down")
    });
    assert!(down, "never marked down:\n{}", relay.output());
    m.restart();
    relay.wait_for_output("server marked up", 1, START_DEADLINE);
    let out = relay.output();
    assert!(!out.contains('\x1b'), "ANSI codes in piped logs:\n{out:?}");
    let up = out
        .lines()
        .find(|l| l.contains("server marked up"))
        .unwrap();
    assert!(up.contains(" INFO "), "recovery not at INFO: {up}");
    let down = out
        .lines()
        .find(|l| l.contains("server marked down"))
        .unwrap();
    assert!(down.contains(" WARN "), "{down}");
}

/// Whether process `pid` has exited (gone, or a zombie nobody reaped yet).
fn gone(pid: u32) -> bool {
    matches!(proc_state(pid), None | Some('Z') | Some('X'))
}

/// SIGTERM to a process this test started (directly or as a daemon).
fn terminate(pid: u32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
}

#[test]
fn a_daemon_writes_its_pid_and_logs_reopens_them_and_hands_off() {
    let m = Memcached::start();
    let dir = TempDir::new("daemon");
    let pidfile = dir.path("memrelay.pid");
    let log = dir.path("memrelay.log");
    let handoff = dir.path("handoff.sock");
    let port = free_port("127.0.0.1").to_string();
    let args = |daemon: bool| {
        let mut a: Vec<String> = vec![
            "-l".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.clone(),
            "-t".into(),
            "1".into(),
            "-s".into(),
            m.addr(),
            "--handoff".into(),
            handoff.display().to_string(),
            "--pidfile".into(),
            pidfile.display().to_string(),
        ];
        if daemon {
            a.extend(["-d".into(), "--log-file".into(), log.display().to_string()]);
        }
        a
    };
    let status = Command::new(memrelay_bin())
        .args(args(true))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "the launching process must exit 0");
    let addr = format!("127.0.0.1:{port}");
    assert!(wait_until(START_DEADLINE, || {
        std::net::TcpStream::connect(&addr).is_ok() && pidfile.exists()
    }));
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Whatever happens next, the daemon is stopped.
    struct Stop(u32);
    impl Drop for Stop {
        fn drop(&mut self) {
            if !gone(self.0) {
                // SAFETY: kill(2) on the daemon this test started.
                unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGKILL) };
            }
        }
    }
    let _daemon = Stop(pid);
    assert_eq!(
        stats(&addr).get("pid"),
        Some(&pid.to_string()),
        "the pid file names another process"
    );
    assert!(wait_until(START_DEADLINE, || std::fs::read_to_string(&log)
        .is_ok_and(|t| t.contains("memrelay started"))));
    // logrotate: move the file away, SIGUSR1, a new file is written.
    let rotated = dir.path("memrelay.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    // SAFETY: kill(2) on the daemon this test started.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGUSR1) };
    assert!(
        wait_until(START_DEADLINE, || std::fs::read_to_string(&log)
            .is_ok_and(|t| t.contains("log file reopened"))),
        "no new log file after SIGUSR1"
    );
    assert!(!std::fs::read_to_string(&rotated).unwrap().contains('\x1b'));

    // A new memrelay with the same --handoff takes the port over from the
    // daemon, which drains and exits.
    let mut new = Command::new(memrelay_bin())
        .args(args(false))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Stopped too, whatever happens next.
    let _new = Stop(new.id());
    let took_over = wait_until(START_DEADLINE, || gone(pid));
    let new_pid = new.id();
    let exited_early = new.try_wait().unwrap();
    if !took_over || exited_early.is_some() {
        let _ = new.kill();
        let out = new.wait_with_output().unwrap();
        panic!(
            "no hand-off from the daemon (daemon gone: {took_over}); the new one said:\n{}",
            text(&out.stderr)
        );
    }
    assert_eq!(stats(&addr).get("pid"), Some(&new_pid.to_string()));
    assert!(wait_until(START_DEADLINE, || std::fs::read_to_string(
        &pidfile
    )
    .is_ok_and(|t| t.trim() == new_pid.to_string())));
    terminate(new_pid);
    let stopped = wait_until(START_DEADLINE, || matches!(new.try_wait(), Ok(Some(_))));
    if !stopped {
        let _ = new.kill();
        let _ = new.wait();
    }
    assert!(stopped, "the new memrelay did not stop on SIGTERM");
    assert!(!pidfile.exists(), "the pid file outlived its process");
}
