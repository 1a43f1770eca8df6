//! Client authentication: `--auth-file`, memcached's `-Y` scheme.
//!
//! Differential: each script runs on a fresh connection to a memcached
//! started with `-Y FILE` (the reference) and to memrelay started with
//! `--auth-file FILE` in front of two plain memcached, and the transcripts
//! must be byte-identical. (The differential suite's sentinel `set` would
//! itself be an authentication attempt, hence this harness: before
//! authentication every input gets exactly one line, so each step says how
//! many lines to read.) Each step is one input: memcached 1.6 answers
//! unauthenticated inputs that arrive in one read with one shared response,
//! so only the last of them is answered (where a read ends depends on the
//! network); memrelay answers each, as memcached does when they come one at
//! a time. Then what memcached does not do: pipelined inputs all answered,
//! nothing reaches a server before authentication, over-long credentials
//! close the connection, a readable auth file is warned about.
#![allow(clippy::panic, clippy::unwrap_used)]

mod support;

use support::{escape, Client, End, Memcached, Memrelay, TempFile};

/// The auth file of every case: a password may hold `:`.
const AUTH_FILE: &[u8] = b"user:pass\nother:s3:cr3t\n";

/// One step of a script on one connection.
struct Step {
    /// Written one after the other (separate writes).
    writes: Vec<Vec<u8>>,
    /// Reply lines to read; None: read until the server closes.
    lines: Option<usize>,
}

fn step(bytes: impl AsRef<[u8]>, lines: usize) -> Step {
    Step {
        writes: vec![bytes.as_ref().to_vec()],
        lines: Some(lines),
    }
}

/// `bytes` one byte per write.
fn bytewise(bytes: impl AsRef<[u8]>, lines: usize) -> Step {
    Step {
        writes: bytes.as_ref().iter().map(|&b| vec![b]).collect(),
        lines: Some(lines),
    }
}

fn until_close(bytes: impl AsRef<[u8]>) -> Step {
    Step {
        writes: vec![bytes.as_ref().to_vec()],
        lines: None,
    }
}

/// The authentication `set` for `payload`.
fn login(payload: &str) -> String {
    format!("set auth 0 0 {}\r\n{payload}\r\n", payload.len())
}

fn count_lines(b: &[u8]) -> usize {
    b.windows(2).filter(|w| w == b"\r\n").count()
}

/// Runs a script on a new connection to `addr`: each step's reply and how
/// it ended.
fn transcript(addr: &str, steps: &[Step]) -> Vec<(Vec<u8>, End)> {
    let mut c = Client::connect(addr);
    let mut out = Vec::new();
    for s in steps {
        let (last, first) = s.writes.split_last().expect("a step writes something");
        for w in first {
            c.write_raw(w);
        }
        let r = match s.lines {
            Some(0) => {
                c.write_raw(last);
                support::Reply {
                    bytes: Vec::new(),
                    end: End::Complete,
                }
            }
            Some(n) => c.send_until(last, |b| count_lines(b) >= n),
            None => c.send_until_close(last),
        };
        let stop = r.end != End::Complete;
        out.push((r.bytes, r.end));
        if stop {
            break;
        }
    }
    out
}

/// The same script against `memcached -Y` and memrelay `--auth-file`.
fn differential(name: &str, steps: Vec<Step>) {
    let file = TempFile::new("auth", AUTH_FILE, 0o600);
    let reference = Memcached::start_with("127.0.0.1", &["-Y", file.path()]);
    let shards = [Memcached::start(), Memcached::start()];
    let mut args = vec!["--auth-file".to_string(), file.path().to_string()];
    for s in &shards {
        args.extend(["-s".to_string(), s.addr()]);
    }
    let relay = Memrelay::start(&args);
    let want = transcript(&reference.addr(), &steps);
    for (i, (s, (bytes, end))) in steps.iter().zip(&want).enumerate() {
        let expected = if s.lines.is_some() {
            End::Complete
        } else {
            End::Closed
        };
        assert_eq!(
            *end,
            expected,
            "harness: [{name}] step {i} on memcached -Y: {}",
            escape(bytes)
        );
    }
    let got = transcript(&relay.addr(), &steps);
    for (i, s) in steps.iter().enumerate() {
        let request = escape(&s.writes.concat());
        assert_eq!(
            got.get(i),
            want.get(i),
            "[{name}] step {i}: memrelay differs from memcached -Y\nrequest:\n{request}\n\
             memcached: {:?}\nmemrelay: {:?}\nmemrelay output:\n{}",
            want.get(i).map(|(b, e)| (escape(b), e)),
            got.get(i).map(|(b, e)| (escape(b), e)),
            relay.output()
        );
    }
}

#[test]
fn commands_before_authentication() {
    differential(
        "commands before authentication",
        vec![
            step("get foo\r\n", 1),
            step("gets foo bar\r\n", 1),
            step("version\r\n", 1),
            step("stats\r\n", 1),
            step("mg foo v\r\n", 1),
            step("mn\r\n", 1),
            step("delete foo\r\n", 1),
            step("incr foo 1\r\n", 1),
            step("flush_all\r\n", 1),
            step("quit\r\n", 1),
            step("\r\n", 1),
            step("     \r\n", 1),
            step("get\r\n", 1),
            // A storage command other than set, then its data as a line.
            step("add k 0 0 9\r\n", 1),
            step("user pass\r\n", 1),
            step("set a b c\r\n", 1),
            step("set k 0 0 x\r\n", 1),
            step("set k 0 0 -1\r\n", 1),
            step("set\0k 0 0 9\r\n", 1),
            step("memrelay resync 127.0.0.1:1\r\n", 1),
            step("get foo\n", 1),
            // Still answering, and still not authenticated.
            step("get foo\r\n", 1),
        ],
    );
}

#[test]
fn failed_attempts_then_success() {
    differential(
        "failed attempts then success",
        vec![
            step(login("user wrong"), 1),
            step(login("nobody pass"), 1),
            step(login("user pas"), 1),
            step(login("user passs"), 1),
            step(login("use pass"), 1),
            step(login("USER pass"), 1),
            step(login("user pass\r"), 1),
            step(login("user"), 1),
            step(login(""), 1),
            step("set k 0 0 4\r\nuser\r\n", 1),
            // The data does not end where announced.
            step("set k 0 0 3\r\nuse\rX", 1),
            step("set k 0 0 3\r\nuse\n\r", 1),
            step(login("user:pass"), 1),
            step(login("other s3:cr3t"), 1),
            // Authenticated: plain memcached from here, and the login
            // stored nothing.
            step("get auth\r\n", 1),
            step(login("user pass"), 1),
            step("get auth\r\n", 3),
            step("mn\r\n", 1),
        ],
    );
}

/// Credentials with spaces around and a token after them.
const EXTRA: &str = "  user   pass  extra ";

#[test]
fn extra_tokens_and_spaces_are_ignored() {
    differential(
        "extra tokens",
        vec![
            step(
                format!("set anything 12 34 {} noreply\r\n{EXTRA}\r\n", EXTRA.len()),
                1,
            ),
            step("set k 0 0 1\r\nx\r\n", 1),
            step("get k\r\n", 3),
        ],
    );
}

#[test]
fn authentication_one_byte_per_write() {
    differential(
        "one byte per write",
        vec![bytewise(login("other s3:cr3t"), 1), step("get x\r\n", 1)],
    );
}

#[test]
fn a_long_line_before_authentication_closes() {
    differential(
        "long line",
        vec![step("get x\r\n", 1), until_close("x".repeat(3000))],
    );
}

/// memrelay in front of one memcached, with the test auth file.
fn relay_with_auth(m: &Memcached) -> (Memrelay, TempFile) {
    let file = TempFile::new("auth", AUTH_FILE, 0o600);
    let relay = Memrelay::start(&["--auth-file", file.path(), "-s", &m.addr()]);
    (relay, file)
}

#[test]
fn pipelined_inputs_are_each_answered() {
    // (memcached -Y would answer only the last input before `STORED`.)
    let m = Memcached::start();
    let (relay, _file) = relay_with_auth(&m);
    let mut c = Client::connect(&relay.addr());
    let req = format!(
        "get a\r\nset k 0 0 3\r\nuse\rX{}get a\r\nset a 0 0 1\r\nz\r\nget a\r\n",
        login("user pass")
    );
    let want: &[u8] = b"CLIENT_ERROR unauthenticated\r\n\
        CLIENT_ERROR bad command line termination\r\n\
        STORED\r\nEND\r\nSTORED\r\nVALUE a 0 1\r\nz\r\nEND\r\n";
    let r = c.send_until(req.as_bytes(), |b| b.len() >= want.len());
    assert_eq!(r.bytes, want, "{}", escape(&r.bytes));
}

#[test]
fn nothing_reaches_the_servers_before_authentication() {
    let m = Memcached::start();
    let (relay, _file) = relay_with_auth(&m);
    let mut direct = m.client();
    let r = direct.send_until(b"set k 0 0 1\r\nv\r\n", |b| b.ends_with(b"\r\n"));
    assert_eq!(r.bytes, b"STORED\r\n");
    let mut c = Client::connect(&relay.addr());
    let unauthenticated = b"CLIENT_ERROR unauthenticated\r\n";
    for req in [
        &b"get k\r\n"[..],
        b"mg k v\r\n",
        b"delete k\r\n",
        b"incr k 1\r\n",
        b"touch k 10\r\n",
        b"flush_all\r\n",
    ] {
        let r = c.send_until(req, |b| b.ends_with(b"\r\n"));
        assert_eq!(r.bytes, unauthenticated, "{}", escape(req));
    }
    let stats = direct.send_until(b"stats\r\n", |b| b.ends_with(b"END\r\n"));
    let stats = String::from_utf8_lossy(&stats.bytes).into_owned();
    for zero in [
        "cmd_get 0",
        "cmd_touch 0",
        "delete_hits 0",
        "incr_misses 0",
        "cmd_flush 0",
    ] {
        assert!(
            stats.contains(&format!("STAT {zero}\r\n")),
            "memcached saw a request sent before authentication ({zero} expected):\n{stats}"
        );
    }
    let r = c.send_until(login("user pass").as_bytes(), |b| b.ends_with(b"\r\n"));
    assert_eq!(r.bytes, b"STORED\r\n");
    let r = c.send_until(b"get k\r\n", |b| b.ends_with(b"END\r\n"));
    assert_eq!(r.bytes, b"VALUE k 0 1\r\nv\r\nEND\r\n");
    // Each connection authenticates on its own.
    let mut other = Client::connect(&relay.addr());
    let r = other.send_until(b"get k\r\n", |b| b.ends_with(b"\r\n"));
    assert_eq!(r.bytes, unauthenticated);
    let mut s = Client::connect(&relay.addr());
    let r = s.send_until(
        format!("{}stats\r\n", login("other s3:cr3t")).as_bytes(),
        |b| b.ends_with(b"END\r\n"),
    );
    let text = String::from_utf8_lossy(&r.bytes);
    assert!(
        text.contains("STAT auth_cmds 2\r\n") && text.contains("STAT auth_errors 0\r\n"),
        "{text}"
    );
}

#[test]
fn long_credentials_close_the_connection() {
    // memcached would wait for the announced bytes; memrelay does not
    // buffer more than credentials can be for a client not yet known.
    let m = Memcached::start();
    let (relay, _file) = relay_with_auth(&m);
    for len in ["5000", "2147483648", "4294967295"] {
        let mut c = Client::connect(&relay.addr());
        let r = c.send_until_close(format!("set k 0 0 {len}\r\n").as_bytes());
        assert_eq!(
            (r.bytes.as_slice(), r.end),
            (&b"CLIENT_ERROR authentication failure\r\n"[..], End::Closed),
            "{len}-byte credentials: {}",
            escape(&r.bytes)
        );
    }
    let mut c = Client::connect(&relay.addr());
    let r = c.send_until(login("user pass").as_bytes(), |b| b.ends_with(b"\r\n"));
    assert_eq!(r.bytes, b"STORED\r\n");
}

#[test]
fn an_auth_file_others_can_read_is_warned_about() {
    let m = Memcached::start();
    let file = TempFile::new("auth", AUTH_FILE, 0o644);
    let relay = Memrelay::start(&["--auth-file", file.path(), "-s", &m.addr()]);
    let seen = support::wait_until(std::time::Duration::from_secs(5), || {
        relay.output().contains("readable by group or others")
    });
    assert!(seen, "no warning about mode 0644:\n{}", relay.output());
    let mut c = Client::connect(&relay.addr());
    let r = c.send_until(login("user pass").as_bytes(), |b| b.ends_with(b"\r\n"));
    assert_eq!(r.bytes, b"STORED\r\n");
}

#[test]
fn check_config_says_what_a_start_would_warn_about() {
    let file = TempFile::new("auth", AUTH_FILE, 0o644);
    let out = support::run_memrelay(
        &[
            "--auth-file",
            file.path(),
            "-s",
            "127.0.0.1:1",
            "--check-config",
        ],
        std::time::Duration::from_secs(10),
        None,
    );
    assert_eq!(out.status.and_then(|s| s.code()), Some(0), "{}", out.stderr);
    assert!(
        out.stderr.contains("warning") && out.stderr.contains("readable by group or others"),
        "{}",
        out.stderr
    );
}
