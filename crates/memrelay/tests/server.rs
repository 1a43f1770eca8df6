//! The process around the proxy: connection limit, unix socket and its
//! permissions, dropping privileges, detaching. Real memcached behind it.
#![allow(clippy::panic, clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::{
    free_port, http_get, memrelay_bin, stat_u64, wait_until, Client, Memcached, Memrelay,
    IO_DEADLINE, START_DEADLINE,
};

/// Reads until EOF or the deadline.
fn read_to_close(s: &mut impl Read) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

#[test]
fn over_the_connection_limit_clients_get_memcacheds_error() {
    let m = Memcached::start();
    let relay = Memrelay::start(&["-n", "2", "-t", "1", "-s", &m.addr()]);
    let mut a = Client::connect(&relay.addr());
    // The start-up probe's connection may still be counted for a moment.
    let alone = wait_until(START_DEADLINE, || {
        let r = a.send_until(b"stats\r\n", |b| b.ends_with(b"END\r\n"));
        String::from_utf8_lossy(&r.bytes).contains("STAT curr_connections 1\r\n")
    });
    assert!(alone, "curr_connections never settled at 1");
    let mut b = Client::connect(&relay.addr());
    for c in [&mut a, &mut b] {
        let r = c.send_until(b"get nothing\r\n", |b| b.ends_with(b"END\r\n"));
        assert_eq!(r.bytes, b"END\r\n");
    }
    let mut third = std::net::TcpStream::connect(relay.addr()).unwrap();
    third.set_read_timeout(Some(IO_DEADLINE)).unwrap();
    assert_eq!(
        read_to_close(&mut third),
        b"ERROR Too many open connections\r\n"
    );
    // A slot frees up when a client leaves.
    drop(a);
    let ok = wait_until(START_DEADLINE, || {
        let Ok(mut s) = std::net::TcpStream::connect(relay.addr()) else {
            return false;
        };
        s.set_read_timeout(Some(IO_DEADLINE)).unwrap();
        s.write_all(b"get nothing\r\n").unwrap();
        let mut buf = [0u8; 64];
        matches!(s.read(&mut buf), Ok(n) if &buf[..n] == b"END\r\n")
    });
    assert!(ok, "no connection accepted after one client left");
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("memrelay-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn start_unix(path: &Path, extra: &[&str], server: &str) -> Proc {
    let child = Command::new(memrelay_bin())
        .arg("-f")
        .arg(path)
        .args(extra)
        .args(["-s", server])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let p = Proc(child);
    assert!(
        wait_until(START_DEADLINE, || UnixStream::connect(path).is_ok()),
        "unix socket {} never accepted a connection",
        path.display()
    );
    p
}

fn unix_exchange(path: &Path, req: &[u8], done: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(IO_DEADLINE)).unwrap();
    s.write_all(req).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.ends_with(done) {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}

#[test]
fn unix_socket_is_owner_only_by_default_and_serves() {
    let m = Memcached::start();
    let dir = temp_dir("unix");
    let path = dir.join("memrelay.sock");
    let _p = start_unix(&path, &[], &m.addr());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "socket mode {mode:o}");
    let r = unix_exchange(&path, b"set u 0 0 2\r\nok\r\nget u\r\n", b"END\r\n");
    assert_eq!(r, b"STORED\r\nVALUE u 0 2\r\nok\r\nEND\r\n");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unix_socket_mode_is_configurable_and_a_stale_socket_is_replaced() {
    let m = Memcached::start();
    let dir = temp_dir("unixmode");
    let path = dir.join("memrelay.sock");
    // A socket file left behind by a previous run.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let _p = start_unix(&path, &["--unix-mode", "0660"], &m.addr());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode {mode:o}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_regular_file_in_the_way_of_the_unix_socket_is_not_removed() {
    let m = Memcached::start();
    let dir = temp_dir("unixfile");
    let path = dir.join("not-a-socket");
    std::fs::write(&path, b"precious").unwrap();
    let out = Command::new(memrelay_bin())
        .arg("-f")
        .arg(&path)
        .args(["-s", &m.addr()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a socket"), "stderr: {err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    let _ = std::fs::remove_dir_all(&dir);
}

fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .unwrap()
}

#[test]
fn dropping_privileges_after_binding() {
    let m = Memcached::start();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let relay = Memrelay::start(&["-u", "nobody", "-s", &m.addr()]);
        // The port opens when memrelay binds, just before it drops root.
        let dropped = wait_until(START_DEADLINE, || uid_of(relay.pid()) != 0);
        assert!(dropped, "still root after -u nobody");
        let mut c = Client::connect(&relay.addr());
        let r = c.send_until(b"set p 0 0 1\r\nx\r\n", |b| b.ends_with(b"\r\n"));
        assert_eq!(r.bytes, b"STORED\r\n");
    } else {
        // Not root: switching to another user must fail, clearly.
        let out = Command::new(memrelay_bin())
            .args([
                "-p",
                &free_port("127.0.0.1").to_string(),
                "-u",
                "root",
                "-s",
                &m.addr(),
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("not running as root"));
    }
}

#[test]
fn daemon_mode_detaches_and_keeps_serving() {
    let m = Memcached::start();
    let port = free_port("127.0.0.1");
    let addr = format!("127.0.0.1:{port}");
    let status = Command::new(memrelay_bin())
        .args([
            "-d",
            "-l",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-s",
            &m.addr(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "the launching process must exit 0");
    assert!(wait_until(START_DEADLINE, || std::net::TcpStream::connect(
        &addr
    )
    .is_ok()));
    let mut c = Client::connect(&addr);
    let r = c.send_until(b"stats\r\n", |b| b.ends_with(b"END\r\n"));
    let text = String::from_utf8_lossy(&r.bytes).to_string();
    let pid: i32 = text
        .lines()
        .find_map(|l| l.strip_prefix("STAT pid ")?.trim().parse().ok())
        .unwrap();
    // Stop the daemon this test started.
    // SAFETY: kill(2) on the pid the daemon reported for itself.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(wait_until(Duration::from_secs(5), || {
        std::net::TcpStream::connect(&addr).is_err()
    }));
}

fn sigterm(pid: u32) {
    // SAFETY: kill(2) on a process this test started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
}

#[test]
fn sigterm_finishes_requests_in_flight_then_exits() {
    let mut m = Memcached::start();
    let mut relay = Memrelay::start(&["-t", "1", "--timeout", "5s", "-s", &m.addr()]);
    let mut c = Client::connect(&relay.addr());
    let r = c.send_until(b"set d 0 0 2\r\nok\r\n", |b| b.ends_with(b"\r\n"));
    assert_eq!(r.bytes, b"STORED\r\n");
    // An idle client, which must be closed by the drain.
    let mut idle = std::net::TcpStream::connect(relay.addr()).unwrap();
    idle.set_read_timeout(Some(IO_DEADLINE)).unwrap();
    // A request in flight: its server is paused.
    m.stop();
    let mut s = std::net::TcpStream::connect(relay.addr()).unwrap();
    s.set_read_timeout(Some(IO_DEADLINE)).unwrap();
    let before = stat_u64(&relay.addr(), "bytes_read");
    s.write_all(b"get d\r\n").unwrap();
    // memrelay counts a client's bytes as it reads them and dispatches the
    // requests they hold in the same turn: once the get's 7 bytes are
    // counted, it is in flight to the paused server. Each poll's own
    // `stats\r\n` (7 bytes, like the first one, already in `before`)
    // counts too.
    let mut polls = 0;
    let in_flight = wait_until(START_DEADLINE, || {
        polls += 1;
        stat_u64(&relay.addr(), "bytes_read") >= before + 7 * polls + 7
    });
    assert!(in_flight, "memrelay never read the get");
    sigterm(relay.pid());
    // New clients are turned away once the listener is closed.
    assert!(wait_until(START_DEADLINE, || std::net::TcpStream::connect(
        relay.addr()
    )
    .is_err()));
    m.cont();
    assert_eq!(
        read_to_close(&mut s),
        b"VALUE d 0 2\r\nok\r\nEND\r\n",
        "the request in flight was not finished"
    );
    assert_eq!(
        read_to_close(&mut idle),
        b"",
        "the idle client was not closed"
    );
    let exited = wait_until(START_DEADLINE, || relay.try_exit().is_some());
    assert!(exited, "memrelay did not exit after draining");
    assert_eq!(relay.try_exit(), Some(0));
}

#[test]
fn a_new_process_takes_over_the_port_without_refusing_anyone() {
    let m = Memcached::start();
    let port = free_port("127.0.0.1");
    let addr = format!("127.0.0.1:{port}");
    let dir = temp_dir("handoff");
    let handoff = dir.join("handoff.sock");
    let spawn = || {
        Command::new(memrelay_bin())
            .args([
                "-t",
                "1",
                "-l",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-s",
                &m.addr(),
                "--handoff",
            ])
            .arg(&handoff)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut old = Proc(spawn());
    assert!(wait_until(START_DEADLINE, || std::net::TcpStream::connect(
        &addr
    )
    .is_ok()));
    assert!(wait_until(START_DEADLINE, || handoff.exists()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let load: Vec<_> = (0..4)
        .map(|t| {
            let (addr, stop, done) = (addr.clone(), stop.clone(), done.clone());
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u32, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = std::net::TcpStream::connect(&addr).and_then(|mut s| {
                        s.set_read_timeout(Some(IO_DEADLINE))?;
                        s.write_all(format!("set h{t} 0 0 1\r\nx\r\nget h{t}\r\n").as_bytes())?;
                        let mut got = Vec::new();
                        let mut buf = [0u8; 256];
                        while !got.ends_with(b"END\r\n") {
                            let n = s.read(&mut buf)?;
                            if n == 0 {
                                break;
                            }
                            got.extend_from_slice(&buf[..n]);
                        }
                        Ok(got)
                    });
                    match r {
                        Ok(g)
                            if g == format!("STORED\r\nVALUE h{t} 0 1\r\nx\r\nEND\r\n")
                                .into_bytes() =>
                        {
                            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            ok += 1
                        }
                        Ok(g) => {
                            failed.push(format!("bad reply {:?}", String::from_utf8_lossy(&g)))
                        }
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    // The hand-over happens under load: wait until the load is served.
    let loaded = wait_until(START_DEADLINE, || {
        done.load(std::sync::atomic::Ordering::Relaxed) >= 20
    });
    assert!(loaded, "the load never got going before the hand-over");
    // The new process takes the sockets over; the old one drains and exits.
    let new = Proc(spawn());
    let old_exited = wait_until(START_DEADLINE, || matches!(old.0.try_wait(), Ok(Some(_))));
    // Keep the load on until the new process alone has served a good many.
    let after = done.load(std::sync::atomic::Ordering::Relaxed);
    let served = wait_until(Duration::from_secs(30), || {
        done.load(std::sync::atomic::Ordering::Relaxed) >= after + 50
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut ok = 0;
    let mut failed = Vec::new();
    for h in load {
        let (o, f) = h.join().unwrap();
        ok += o;
        failed.extend(f);
    }
    assert!(
        served,
        "the new process did not serve 50 exchanges after the hand-over"
    );
    assert!(
        old_exited,
        "the old memrelay did not exit after handing over"
    );
    assert_eq!(old.0.try_wait().unwrap().and_then(|s| s.code()), Some(0));
    // The new one still serves, and serves the hand-off path for the next.
    let mut c = Client::connect(&addr);
    let r = c.send_until(b"get h0\r\n", |b| b.ends_with(b"END\r\n"));
    assert!(
        r.bytes.starts_with(b"VALUE h0"),
        "{:?}",
        String::from_utf8_lossy(&r.bytes)
    );
    drop(new);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok >= 50, "only {ok} exchanges");
    assert!(
        failed.is_empty(),
        "{} of {} exchanges failed during the hand-over: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
}

#[test]
fn metrics_endpoint_serves_prometheus_text_and_health() {
    let mut m = Memcached::start();
    let maddr = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let relay = Memrelay::start(&[
        "-t",
        "2",
        "--failure-limit",
        "1",
        "--metrics",
        &maddr,
        "-s",
        &m.addr(),
    ]);
    let mut c = Client::connect(&relay.addr());
    for i in 0..50 {
        let r = c.send_until(format!("get metrics-{i}\r\n").as_bytes(), |b| {
            b.ends_with(b"END\r\n")
        });
        assert_eq!(r.bytes, b"END\r\n");
    }
    let (status, body) = http_get(&maddr, "/metrics");
    assert_eq!(status, 200);
    let mut values = std::collections::HashMap::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        values.insert(name.to_string(), v);
    }
    assert!(values["memrelay_cmd_get_total"] >= 50.0, "{body}");
    assert!(
        values[r#"memrelay_request_duration_seconds_count{command="get"}"#] >= 50.0,
        "{body}"
    );
    let mut last = 0.0;
    for line in body
        .lines()
        .filter(|l| l.starts_with(r#"memrelay_request_duration_seconds_bucket{command="get""#))
    {
        let v: f64 = line.rsplit_once(' ').unwrap().1.parse().unwrap();
        assert!(v >= last, "histogram buckets must be cumulative: {line}");
        last = v;
    }
    assert_eq!(
        values[&format!(
            "memrelay_server_up{{server=\"{}\",role=\"primary\"}}",
            m.addr()
        )],
        1.0
    );
    // Per server: the 50 gets (and whatever the prober does not count).
    let per_server = values[&format!(
        "memrelay_server_request_duration_seconds_count{{server=\"{}\",role=\"primary\"}}",
        m.addr()
    )];
    assert!(per_server >= 50.0, "{body}");
    assert_eq!(http_get(&maddr, "/healthz").0, 200);
    assert_eq!(http_get(&maddr, "/readyz").0, 200);
    assert_eq!(http_get(&maddr, "/nothing").0, 404);
    // The only primary dies: nothing can be served, and /readyz says so.
    m.kill();
    let unready = wait_until(START_DEADLINE, || {
        let _ = c.send_until(b"get metrics-0\r\n", |b| b.ends_with(b"END\r\n"));
        http_get(&maddr, "/readyz").0 == 503
    });
    assert!(unready, "/readyz still ready with the only primary down");
}

#[test]
fn flush_all_is_refused_unless_enabled() {
    let m = Memcached::start();
    let relay = Memrelay::start(&["-s", &m.addr()]);
    let mut c = Client::connect(&relay.addr());
    let r = c.send_until(
        b"set f 0 0 1\r\nx\r\nflush_all\r\nflush_all noreply\r\nget f\r\n",
        |b| b.ends_with(b"END\r\n"),
    );
    assert_eq!(
        r.bytes,
        b"STORED\r\nCLIENT_ERROR flush_all not allowed\r\nVALUE f 0 1\r\nx\r\nEND\r\n",
        "{}",
        String::from_utf8_lossy(&r.bytes)
    );
    let relay = Memrelay::start(&["--enable-flush-all", "-s", &m.addr()]);
    let mut c = Client::connect(&relay.addr());
    let r = c.send_until(b"flush_all\r\nget f\r\n", |b| b.ends_with(b"END\r\n"));
    assert_eq!(
        r.bytes,
        b"OK\r\nEND\r\n",
        "{}",
        String::from_utf8_lossy(&r.bytes)
    );
}

#[test]
fn idle_clients_are_closed_only_with_idle_timeout() {
    let m = Memcached::start();
    let relay = Memrelay::start(&["--idle-timeout", "300ms", "-s", &m.addr()]);
    // An idle client is closed.
    let mut idle = std::net::TcpStream::connect(relay.addr()).unwrap();
    idle.set_read_timeout(Some(IO_DEADLINE)).unwrap();
    idle.write_all(b"get x\r\n").unwrap();
    let t = std::time::Instant::now();
    assert_eq!(read_to_close(&mut idle), b"END\r\n");
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "closed only after {:?}",
        t.elapsed()
    );
    // A client that keeps talking is not.
    let mut busy = Client::connect(&relay.addr());
    for _ in 0..10 {
        let r = busy.send_until(b"get x\r\n", |b| b.ends_with(b"END\r\n"));
        assert_eq!(r.bytes, b"END\r\n");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Without the flag, nobody is closed for being idle.
    let relay = Memrelay::start(&["-s", &m.addr()]);
    let mut quiet = std::net::TcpStream::connect(relay.addr()).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    quiet.write_all(b"get x\r\n").unwrap();
    quiet.set_read_timeout(Some(IO_DEADLINE)).unwrap();
    let mut buf = [0u8; 16];
    let n = quiet.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"END\r\n");
}
