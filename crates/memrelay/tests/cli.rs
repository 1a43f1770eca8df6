//! Command-line behaviour: invalid arguments exit with code 64 and a
//! one-line error naming the flag (then a usage line) without binding the
//! listening port; `-h` prints usage; `-s` accepts host names and IPv6.
#![allow(clippy::panic, clippy::unwrap_used)]

mod support;

use std::net::TcpListener;
use std::time::Duration;
use support::{complete_retrieval, escape, free_port, run_memrelay, Memcached, Memrelay, TempFile};

const EXIT_DEADLINE: Duration = Duration::from_secs(10);
const EX_USAGE: i32 = 64;

/// Runs memrelay with `args` and checks the usage-error contract: exit 64
/// within the deadline, first stderr line names `flag`, a usage line
/// follows, and (when `port` is given) memrelay never listened on it.
fn expect_usage_error(args: &[String], flag: &str, port: Option<u16>) {
    let out = run_memrelay(args, EXIT_DEADLINE, port);
    let ctx = format!(
        "args {args:?}\nstdout:\n{}\nstderr:\n{}",
        out.stdout, out.stderr
    );
    let status = out
        .status
        .unwrap_or_else(|| panic!("still running after {EXIT_DEADLINE:?}; {ctx}"));
    assert_eq!(status.code(), Some(EX_USAGE), "exit status {status}; {ctx}");
    let first = out.stderr.lines().next().unwrap_or("");
    assert!(
        first.contains(flag),
        "first stderr line {first:?} does not name {flag:?}; {ctx}"
    );
    assert!(
        out.stderr
            .lines()
            .skip(1)
            .any(|l| l.to_ascii_lowercase().contains("usage")),
        "no usage line after the error; {ctx}"
    );
    if let Some(p) = port {
        assert!(!out.port_was_bound, "memrelay listened on port {p}; {ctx}");
    }
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// `-l 127.0.0.1 -p PORT` followed by `rest`, and PORT.
fn with_port(rest: &[&str]) -> (Vec<String>, u16) {
    let port = free_port("127.0.0.1");
    let mut a = args(&["-l", "127.0.0.1", "-p", &port.to_string()]);
    a.extend(args(rest));
    (a, port)
}

#[test]
fn unknown_flag() {
    let (a, port) = with_port(&["-s", "127.0.0.1:11211", "--bogus-flag"]);
    expect_usage_error(&a, "--bogus-flag", Some(port));
}

#[test]
fn unknown_short_flag() {
    let (a, port) = with_port(&["-s", "127.0.0.1:11211", "-Z"]);
    expect_usage_error(&a, "-Z", Some(port));
}

#[test]
fn missing_value_for_p() {
    expect_usage_error(
        &args(&["-l", "127.0.0.1", "-s", "127.0.0.1:11211", "-p"]),
        "-p",
        None,
    );
}

#[test]
fn non_numeric_p() {
    expect_usage_error(
        &args(&["-l", "127.0.0.1", "-s", "127.0.0.1:11211", "-p", "abc"]),
        "-p",
        None,
    );
}

#[test]
fn p_out_of_range() {
    for bad in ["65536", "70000", "-1", "99999999999999999999"] {
        expect_usage_error(
            &args(&["-l", "127.0.0.1", "-s", "127.0.0.1:11211", "-p", bad]),
            "-p",
            None,
        );
    }
}

#[test]
fn s_without_port() {
    let (a, port) = with_port(&["-s", "127.0.0.1"]);
    expect_usage_error(&a, "-s", Some(port));
}

#[test]
fn s_with_bad_port() {
    for bad in ["127.0.0.1:", "127.0.0.1:abc", "127.0.0.1:70000"] {
        let (a, port) = with_port(&["-s", bad]);
        expect_usage_error(&a, "-s", Some(port));
    }
}

#[test]
fn s_with_bad_address() {
    for bad in ["999.1.1.1:11211", "[::1:11211", ":11211"] {
        let (a, port) = with_port(&["-s", bad]);
        expect_usage_error(&a, "-s", Some(port));
    }
}

#[test]
fn missing_value_for_s() {
    let (mut a, port) = with_port(&[]);
    a.push("-s".into());
    expect_usage_error(&a, "-s", Some(port));
}

#[test]
fn no_s_at_all() {
    let (a, port) = with_port(&[]);
    expect_usage_error(&a, "-s", Some(port));
}

#[test]
fn usage_error_does_not_bind_even_when_port_is_held() {
    // With the port already taken, a binary that binds before validating
    // would report a bind failure instead of the flag.
    let holder = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = holder.local_addr().unwrap().port();
    let a = args(&[
        "-l",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-s",
        "127.0.0.1:11211",
        "--nope",
    ]);
    let out = run_memrelay(&a, EXIT_DEADLINE, None);
    let status = out
        .status
        .unwrap_or_else(|| panic!("still running; {out:?}"));
    assert_eq!(status.code(), Some(EX_USAGE), "{out:?}");
    assert!(
        out.stderr.lines().next().unwrap_or("").contains("--nope"),
        "{out:?}"
    );
}

#[test]
fn help_prints_usage_and_exits_0() {
    let out = run_memrelay(&["-h"], EXIT_DEADLINE, None);
    let status = out
        .status
        .unwrap_or_else(|| panic!("still running; {out:?}"));
    assert_eq!(status.code(), Some(0), "{out:?}");
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(
        text.to_ascii_lowercase().contains("usage"),
        "no usage text: {out:?}"
    );
    for flag in ["-s", "-p", "-l"] {
        assert!(
            text.contains(flag),
            "usage does not mention {flag}: {out:?}"
        );
    }
}

/// Stores a value through the proxy and checks it landed on `backend`.
fn roundtrip_through(relay: &Memrelay, backend: &Memcached, key: &str) {
    let mut c = relay.client();
    let r = c.send_until(format!("set {key} 0 0 2\r\nok\r\n").as_bytes(), |b| {
        b.ends_with(b"\r\n")
    });
    assert_eq!(
        r.bytes,
        b"STORED\r\n",
        "set via memrelay: {}\n{}",
        escape(&r.bytes),
        relay.output()
    );
    let want = format!("VALUE {key} 0 2\r\nok\r\nEND\r\n").into_bytes();
    let r = c.send_until(format!("get {key}\r\n").as_bytes(), complete_retrieval);
    assert_eq!(
        r.bytes,
        want,
        "get via memrelay: {}\n{}",
        escape(&r.bytes),
        relay.output()
    );
    let r = backend
        .client()
        .send_until(format!("get {key}\r\n").as_bytes(), complete_retrieval);
    assert_eq!(r.bytes, want, "get on the backend: {}", escape(&r.bytes));
}

#[test]
fn s_accepts_hostname() {
    let mc = Memcached::start();
    let relay = Memrelay::start(&["-s", &format!("localhost:{}", mc.port())]);
    roundtrip_through(&relay, &mc, "via-localhost");
}

#[test]
fn s_accepts_ipv6_literal() {
    let mc = Memcached::start_on("::1");
    assert_eq!(mc.addr(), format!("[::1]:{}", mc.port()));
    let relay = Memrelay::start(&["-s", &mc.addr()]);
    roundtrip_through(&relay, &mc, "via-ipv6");
}

#[test]
fn threads_flag_is_accepted() {
    let mc = Memcached::start();
    let relay = Memrelay::start(&["-s", &mc.addr(), "--threads", "2"]);
    roundtrip_through(&relay, &mc, "with-threads");
}

#[test]
fn threads_flag_rejects_garbage() {
    for bad in ["x", "2x"] {
        let (a, port) = with_port(&["-s", "127.0.0.1:11211", "--threads", bad]);
        expect_usage_error(&a, "--threads", Some(port));
    }
}

#[test]
fn auth_file_that_cannot_be_used_stops_the_start() {
    let empty = TempFile::new("empty", b"", 0o600);
    let malformed = TempFile::new("malformed", b"user:pass\nnocolon\n", 0o600);
    let spaced = TempFile::new("spaced", b"user:pass word\n", 0o600);
    let missing =
        std::env::temp_dir().join(format!("memrelay-no-such-file-{}", std::process::id()));
    for path in [
        empty.path(),
        malformed.path(),
        spaced.path(),
        missing.to_str().unwrap(),
    ] {
        let (a, port) = with_port(&["-s", "127.0.0.1:11211", "--auth-file", path]);
        expect_usage_error(&a, "--auth-file", Some(port));
    }
}

#[test]
fn max_reply_size_must_hold_one_value() {
    // At least --max-value-size + 32 KiB (default value size 1 MiB).
    let (a, port) = with_port(&["-s", "127.0.0.1:11211", "--max-reply-size", "1048576"]);
    expect_usage_error(&a, "--max-reply-size", Some(port));
    let (a, port) = with_port(&[
        "-s",
        "127.0.0.1:11211",
        "--max-value-size",
        "1000",
        "--max-reply-size",
        "40000",
    ]);
    let out = run_memrelay(&a, Duration::from_millis(500), Some(port));
    assert!(
        out.status.is_none(),
        "a reply cap over value size + 32 KiB was refused: {}",
        out.stderr
    );
}
