//! The configuration file through the binary: errors name the file and the
//! key and exit 64 without binding; flags override the file;
//! `--check-config` validates without binding; a memrelay configured by a
//! file serves; every shipped example is valid; JSON logs are JSON.
#![allow(clippy::panic, clippy::unwrap_used)]

mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::{
    complete_retrieval, escape, free_port, run_memrelay, wait_until, Client, Memcached, Memrelay,
    RunOutput, TempDir, START_DEADLINE,
};

const EXIT_DEADLINE: Duration = Duration::from_secs(10);
const EX_USAGE: i32 = 64;

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn context(args: &[String], out: &RunOutput) -> String {
    format!(
        "args {args:?}\nstdout:\n{}\nstderr:\n{}",
        out.stdout, out.stderr
    )
}

/// Runs memrelay with `--config FILE` (+ `extra`): it must exit 64 with
/// one line naming the file and `key`. The file's listener is on a port
/// this test holds, so a binary that bound before validating would fail to
/// bind (exit 1, another message) instead. (Watching a free port for a
/// listener would race with the servers other tests start.)
fn expect_file_error(dir: &TempDir, body: &str, extra: &[&str], key: &str) -> String {
    let held = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = held.local_addr().unwrap().port();
    let path = dir.file(
        "memrelay.toml",
        &format!("[[listen]]\naddress = \"127.0.0.1\"\nport = {port}\n{body}"),
    );
    let mut args = vec!["--config".to_string(), s(&path)];
    args.extend(extra.iter().map(|a| a.to_string()));
    let out = run_memrelay(&args, EXIT_DEADLINE, None);
    let ctx = context(&args, &out);
    let status = out
        .status
        .unwrap_or_else(|| panic!("still running after {EXIT_DEADLINE:?}; {ctx}"));
    assert_eq!(status.code(), Some(EX_USAGE), "exit status {status}; {ctx}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "not one line; {ctx}");
    let want = format!("memrelay: {}: {key}: ", path.display());
    assert!(lines[0].starts_with(&want), "expected {want:?}...; {ctx}");
    drop(held);
    lines[0].to_string()
}

const ONE_PRIMARY: &str = "[pools]\nprimaries = [\"127.0.0.1:11211\"]\n";

#[test]
fn an_unknown_key_is_named_with_its_table() {
    let dir = TempDir::new("unknown");
    let line = expect_file_error(
        &dir,
        &format!("{ONE_PRIMARY}[timeouts]\nrequest = \"1s\"\nreqest = \"1s\"\n"),
        &[],
        "timeouts.reqest",
    );
    assert!(line.contains("unknown field"), "{line}");
    expect_file_error(
        &dir,
        &format!("{ONE_PRIMARY}[bogus]\nx = 1\n"),
        &[],
        "bogus",
    );
}

#[test]
fn a_bad_server_address_is_named_with_its_index() {
    let dir = TempDir::new("badaddr");
    let line = expect_file_error(
        &dir,
        "[pools]\nprimaries = [\"127.0.0.1:11211\", \"10.0.0.1\"]\n",
        &[],
        "pools.primaries[1]",
    );
    assert!(line.ends_with("'10.0.0.1' is not host:port"), "{line}");
    expect_file_error(
        &dir,
        "[pools]\nprimaries = [\"127.0.0.1:11211\"]\nbackups = [\"127.0.0.1:99999\"]\n",
        &[],
        "pools.backups[0]",
    );
}

#[test]
fn bad_values_are_named_by_key() {
    let dir = TempDir::new("badvalues");
    let cases = [
        ("[timeouts]\nconnect = \"soon\"\n", "timeouts.connect"),
        ("[timeouts]\nrequest = true\n", "timeouts.request"),
        ("[limits]\nmax_conns = 0\n", "limits.max_conns"),
        ("[pools.x]\n", "pools.x"),
        ("[metrics]\nlisten = \"nowhere\"\n", "metrics.listen"),
        ("[log]\nformat = \"xml\"\n", "log.format"),
        ("[[listen]]\nport = 0\n", "listen[1].port"),
    ];
    for (body, key) in cases {
        let line = expect_file_error(&dir, &format!("{ONE_PRIMARY}{body}"), &[], key);
        assert!(!line.contains('\n'), "{line}");
    }
}

#[test]
fn a_fleet_needs_an_address_for_its_peers_and_a_long_enough_secret() {
    let dir = TempDir::new("config-fleet");
    let line = expect_file_error(
        &dir,
        &format!("{ONE_PRIMARY}[fleet]\npeers = [\"127.0.0.1:12100\"]\n"),
        &[],
        "fleet.peers[0]",
    );
    assert!(line.contains("needs --peer-listen"), "{line}");
    let line = expect_file_error(
        &dir,
        &format!("{ONE_PRIMARY}[fleet]\nlisten = \"127.0.0.1:12100\"\n"),
        &[],
        "fleet.listen",
    );
    assert!(line.contains("needs --peer-secret-file"), "{line}");
    let short = dir.file("short.secret", "too short\n");
    let line = expect_file_error(
        &dir,
        &format!(
            "{ONE_PRIMARY}[fleet]\nlisten = \"127.0.0.1:12100\"\nsecret_file = \"{}\"\n",
            short.display()
        ),
        &[],
        "fleet.secret_file",
    );
    assert!(line.contains("at least 16"), "{line}");
    // A confirmation setting without a fleet would promise nothing.
    let line = expect_file_error(
        &dir,
        &format!("{ONE_PRIMARY}[fleet]\nconfirm = \"all\"\n"),
        &[],
        "fleet.confirm",
    );
    assert!(line.contains("needs --peer-listen"), "{line}");
    let line = expect_file_error(
        &dir,
        &format!("{ONE_PRIMARY}[fleet]\nconfirm = \"most\"\n"),
        &[],
        "fleet.confirm",
    );
    assert!(line.contains("not one of reached, majority, all"), "{line}");
}

#[test]
fn a_file_that_is_not_toml_names_the_line() {
    let dir = TempDir::new("nottoml");
    // Lines 1 to 3 are the listener the helper writes.
    let line = expect_file_error(&dir, "[pools\n", &[], "line 4");
    assert!(line.contains("unclosed table"), "{line}");
    let line = expect_file_error(
        &dir,
        "[pools]\nhash = \"ketama\"\nhash = \"magent\"\n",
        &[],
        "line 6",
    );
    assert!(line.contains("duplicate key"), "{line}");
}

#[test]
fn a_missing_file_is_named() {
    let dir = TempDir::new("missing");
    let path = dir.path("nope.toml");
    let args = vec!["--config".to_string(), s(&path)];
    let out = run_memrelay(&args, EXIT_DEADLINE, None);
    let ctx = context(&args, &out);
    assert_eq!(out.status.and_then(|s| s.code()), Some(EX_USAGE), "{ctx}");
    let first = out.stderr.lines().next().unwrap_or("");
    assert!(
        first.starts_with(&format!("memrelay: {}: cannot read", path.display())),
        "{ctx}"
    );
}

#[test]
fn a_bad_flag_on_top_of_a_good_file_names_the_flag() {
    let dir = TempDir::new("badflag");
    let path = dir.file("memrelay.toml", ONE_PRIMARY);
    let args = vec![
        "--config".to_string(),
        s(&path),
        "--timeout".into(),
        "soon".into(),
    ];
    let out = run_memrelay(&args, EXIT_DEADLINE, None);
    let ctx = context(&args, &out);
    assert_eq!(out.status.and_then(|s| s.code()), Some(EX_USAGE), "{ctx}");
    assert!(out.stderr.starts_with("memrelay: --timeout: "), "{ctx}");
    assert!(out.stderr.contains("usage:"), "{ctx}");
}

/// `--check-config` with `args`: exit 0, the summary on stdout, nothing
/// bound (the file's port is held by another socket the whole time, so a
/// binary that bound would fail).
fn check_config(args: &[String]) -> String {
    let out = run_memrelay(args, EXIT_DEADLINE, None);
    let ctx = context(args, &out);
    assert_eq!(out.status.and_then(|s| s.code()), Some(0), "{ctx}");
    assert!(out.stdout.starts_with("configuration OK"), "{ctx}");
    out.stdout
}

#[test]
fn check_config_validates_without_binding_and_shows_the_flags_on_top() {
    let dir = TempDir::new("check");
    let held = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = held.local_addr().unwrap().port();
    let path = dir.file(
        "memrelay.toml",
        &format!(
            "[[listen]]\nport = {port}\n[pools]\nprimaries = [\"127.0.0.1:11211\", \"127.0.0.1:11212\"]\n\
             backups = [\"127.0.0.1:11213\"]\n[timeouts]\nrequest = \"250ms\"\nconnect = \"1s\"\n"
        ),
    );
    let file_only = check_config(&["--config".into(), s(&path), "--check-config".into()]);
    for want in [
        &format!("listen:     127.0.0.1:{port}\n") as &str,
        "primaries:  127.0.0.1:11211, 127.0.0.1:11212\n",
        "backups:    127.0.0.1:11213\n",
        "request 250ms",
        "connect 1s",
        "server tls: off\n",
        "auth:       off\n",
    ] {
        assert!(file_only.contains(want), "no {want:?} in\n{file_only}");
    }
    // Flags win; a -s replaces the file's primaries, -p its listener.
    let other = free_port("127.0.0.1");
    let both = check_config(&[
        "--check-config".into(),
        "--timeout".into(),
        "2s".into(),
        "-s".into(),
        "127.0.0.1:11300".into(),
        "--config".into(),
        s(&path),
        "-p".into(),
        other.to_string(),
        "--log-format".into(),
        "json".into(),
    ]);
    for want in [
        &format!("listen:     127.0.0.1:{other}\n") as &str,
        "primaries:  127.0.0.1:11300\n",
        "backups:    127.0.0.1:11213\n",
        "request 2s",
        "connect 1s",
        "log:        info, json",
    ] {
        assert!(both.contains(want), "no {want:?} in\n{both}");
    }
    // Without a file, too.
    let flags = check_config(&["-s".into(), "127.0.0.1:1".into(), "--check-config".into()]);
    assert!(flags.contains("primaries:  127.0.0.1:1\n"), "{flags}");
    drop(held);
}

#[test]
fn check_config_reports_errors_like_a_start() {
    let dir = TempDir::new("checkbad");
    expect_file_error(
        &dir,
        "[pools]\nprimaries = []\n",
        &["--check-config"],
        "pools.primaries",
    );
}

/// The examples shipped with memrelay, and the packaged configurations
/// (bases that leave the servers to the command line).
fn shipped_configs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut found = Vec::new();
    let mut dirs = vec![root.join("examples"), root.join("packaging")];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "toml") {
                found.push(p);
            }
        }
    }
    found.sort();
    found
}

#[test]
fn every_shipped_example_is_a_valid_configuration() {
    let files = shipped_configs();
    assert!(
        files.len() >= 3,
        "expected the examples in examples/: {files:?}"
    );
    for f in files {
        let mut args = vec!["--config".into(), s(&f), "--check-config".into()];
        if f.components().any(|c| c.as_os_str() == "packaging") {
            // As the Dockerfile runs it: servers on the command line.
            args.extend(["-s".into(), "127.0.0.1:11211".into()]);
        }
        check_config(&args);
    }
}

#[test]
fn a_memrelay_configured_by_a_file_serves_on_every_listener() {
    let p1 = Memcached::start();
    let p2 = Memcached::start();
    let b = Memcached::start();
    let dir = TempDir::new("serve");
    let sock = dir.path("memrelay.sock");
    let relay = Memrelay::start_with(|port| {
        let path = dir.file(
            "memrelay.toml",
            &format!(
                "[[listen]]\naddress = \"127.0.0.1\"\nport = {port}\n\
                 [[listen]]\nunix = \"{}\"\nmode = \"0750\"\n\
                 [pools]\nprimaries = [\"{}\", \"{}\"]\nbackups = [\"{}\"]\n\
                 [process]\nthreads = 1\n",
                sock.display(),
                p1.addr(),
                p2.addr(),
                b.addr()
            ),
        );
        vec!["--config".into(), s(&path)]
    });
    let mut c = relay.client();
    for i in 0..20 {
        let r = c.send_until(format!("set cfg{i} 0 0 2\r\nok\r\n").as_bytes(), |b| {
            b.ends_with(b"\r\n")
        });
        assert_eq!(
            r.bytes,
            b"STORED\r\n",
            "{}\n{}",
            escape(&r.bytes),
            relay.output()
        );
    }
    // Every write reached the backup, and the keys are spread over both
    // primaries: the file's pools are the ones in use.
    let mut on_primary = [0, 0];
    for i in 0..20 {
        let want = format!("VALUE cfg{i} 0 2\r\nok\r\nEND\r\n").into_bytes();
        let get = format!("get cfg{i}\r\n");
        let r = b.client().send_until(get.as_bytes(), complete_retrieval);
        assert_eq!(r.bytes, want, "backup: {}", escape(&r.bytes));
        for (n, p) in [&p1, &p2].iter().enumerate() {
            if p.client()
                .send_until(get.as_bytes(), complete_retrieval)
                .bytes
                == want
            {
                on_primary[n] += 1;
            }
        }
    }
    assert_eq!(on_primary[0] + on_primary[1], 20, "{on_primary:?}");
    assert!(on_primary[0] > 0 && on_primary[1] > 0, "{on_primary:?}");
    // The second listener, with the file's mode.
    assert!(wait_until(START_DEADLINE, || sock.exists()));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o750, "socket mode {mode:o}");
    let mut u = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    use std::io::{Read, Write};
    u.write_all(b"get cfg3\r\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !complete_retrieval(&got) {
        let n = u.read(&mut buf).unwrap();
        assert!(n > 0, "closed after {}", escape(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, b"VALUE cfg3 0 2\r\nok\r\nEND\r\n");
}

#[test]
fn flags_override_the_file_when_serving() {
    let real = Memcached::start();
    let dir = TempDir::new("override");
    // The file's primary does not exist, and its listener is on a port this
    // test holds: memrelay starts and serves only if -p and -s replaced them.
    let held = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let path = dir.file(
        "memrelay.toml",
        &format!(
            "[[listen]]\nport = {}\n[pools]\nprimaries = [\"127.0.0.1:{}\"]\n",
            held.local_addr().unwrap().port(),
            free_port("127.0.0.1")
        ),
    );
    let relay = Memrelay::start_with(|port| {
        vec![
            "--config".into(),
            s(&path),
            "-p".into(),
            port.to_string(),
            "-s".into(),
            real.addr(),
        ]
    });
    let mut c = relay.client();
    let r = c.send_until(b"set ov 0 0 1\r\nx\r\n", |b| b.ends_with(b"\r\n"));
    assert_eq!(r.bytes, b"STORED\r\n", "{}", relay.output());
    let r = real.client().send_until(b"get ov\r\n", complete_retrieval);
    assert_eq!(r.bytes, b"VALUE ov 0 1\r\nx\r\nEND\r\n");
    drop(held);
}

/// Every line memrelay wrote (stdout and stderr) so far, as JSON objects.
fn json_lines(relay: &Memrelay) -> Vec<serde_json::Value> {
    relay
        .output()
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}\n{}", relay.output()))
        })
        .collect()
}

#[test]
fn json_logs_are_one_object_a_line() {
    let mut m = Memcached::start();
    let dir = TempDir::new("json");
    let path = dir.file("memrelay.toml", "[log]\nformat = \"json\"\n");
    let relay = Memrelay::start(&[
        "--config",
        &s(&path),
        "-s",
        &m.addr(),
        "--failure-limit",
        "1",
        "-t",
        "1",
    ]);
    let started = wait_until(START_DEADLINE, || {
        json_lines(&relay)
            .iter()
            .any(|j| j["message"] == "memrelay started")
    });
    assert!(started, "no start line: {}", relay.output());
    // A server going down is logged with its fields.
    m.kill();
    let mut c = Client::connect(&relay.addr());
    let down = wait_until(START_DEADLINE, || {
        let _ = c.send_until(b"get j\r\n", |b| b.ends_with(b"\r\n"));
        json_lines(&relay).iter().any(|j| j["level"] == "WARN")
    });
    assert!(down, "no warning logged: {}", relay.output());
    for j in json_lines(&relay) {
        for field in ["timestamp", "level", "message", "target"] {
            assert!(j.get(field).is_some(), "no {field} in {j}");
        }
    }
    let start = json_lines(&relay)
        .into_iter()
        .find(|j| j["message"] == "memrelay started")
        .unwrap();
    assert_eq!(start["primaries"], m.addr(), "{start}");
    assert_eq!(start["config"], s(&path), "{start}");
}

#[test]
fn further_backup_tiers_from_the_file_and_the_command_line() {
    let dir = TempDir::new("tiers");
    let path = dir.file(
        "memrelay.toml",
        "[pools]\nprimaries = [\"127.0.0.1:21001\"]\nbackups = [\"127.0.0.1:21002\"]\n\
         more_backup_tiers = [[\"127.0.0.1:21003\", \"127.0.0.1:21004\"]]\n",
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_memrelay"))
        .arg("--config")
        .arg(&path)
        .arg("--check-config")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("backups 2:  127.0.0.1:21003, 127.0.0.1:21004")
            || text.contains("backups 2:  127.0.0.1:21003 127.0.0.1:21004"),
        "{text}"
    );
    // A further tier needs a first one; at most three backup tiers.
    for (args, why) in [
        (
            vec!["-s", "127.0.0.1:21001", "--backup-tier", "127.0.0.1:21003"],
            "needs a first one",
        ),
        (
            vec![
                "-s",
                "127.0.0.1:21001",
                "-b",
                "127.0.0.1:21002",
                "--backup-tier",
                "127.0.0.1:21003",
                "--backup-tier",
                "127.0.0.1:21004",
                "--backup-tier",
                "127.0.0.1:21005",
            ],
            "at most three backup tiers",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_memrelay"))
            .args(&args)
            .arg("--check-config")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains("--backup-tier") && err.contains(why), "{err}");
    }
}

#[test]
fn the_command_lines_auth_file_replaces_the_files_unread() {
    // Flags override the file: the file's auth_file is not even read when
    // --auth-file names another (it was, and a missing one stopped the
    // start).
    let dir = TempDir::new("authoverride");
    let auth = dir.file("auth", "user:secret\n");
    std::fs::set_permissions(&auth, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let path = dir.file(
        "memrelay.toml",
        "[pools]\nprimaries = [\"127.0.0.1:11211\"]\n[process]\nauth_file = \"/nonexistent/auth\"\n",
    );
    check_config(&[
        "--config".into(),
        s(&path),
        "--auth-file".into(),
        s(&auth),
        "--check-config".into(),
    ]);
}
