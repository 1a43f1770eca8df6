//! The command line: magent's flags with magent's meaning, plus long options.
//!
//! Hand-written rather than generated so that the error for a bad argument is
//! exactly one line naming the flag (then the usage line), and so that
//! getopt's conventions that magent users rely on keep working: `-p12000`,
//! `-p 12000`, bundled switches like `-Dv`, and `--long=value`.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use super::auth::Credentials;
use super::{
    default_max_reply, parse_duration, Config, HashKind, Listen, ServerAddr, REPLY_HEADROOM,
};

/// What the command line asks for.
#[derive(Debug)]
pub enum Action {
    Run(Box<Config>),
    Help,
    Version,
}

/// A command-line mistake: the flag it concerns and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError {
    pub flag: String,
    pub message: String,
}

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "memrelay: {}: {}", self.flag, self.message)
    }
}

/// The exit code for usage errors (`EX_USAGE` from sysexits.h).
pub const EXIT_USAGE: i32 = 64;

pub const USAGE_LINE: &str =
    "usage: memrelay [-p port] [-l addr] -s host:port [-s host:port ...] [-b host:port ...] [options] (-h for help)";

pub const HELP: &str = "\
memrelay: a high-availability memcached proxy, a drop-in successor to magent.

Keys are spread over the primary servers (-s); with backup servers (-b),
every write is copied to the key's backup too, and reads are served from the
backup while its primary is down or has lost the key.

usage: memrelay [options] -s host:port [-s host:port ...] [-b host:port ...]

magent-compatible options:
  -p, --port PORT          TCP port to listen on (default 11211)
  -l, --listen ADDR        address to listen on (default 127.0.0.1; magent
                           listened on every interface: use -l 0.0.0.0 or -l ::
                           to do that on purpose)
  -s, --server HOST:PORT   a primary memcached server; repeat for more, order
                           matters for --hash modula and magent
  -b, --backup HOST:PORT   a backup memcached server; repeat for more
  -n, --max-conns N        most client connections at once (default 4096)
  -i, --backend-conns N    persistent connections kept per server per thread,
                           each carrying many requests (default 1, max 64)
  -u, --user USER          drop privileges to USER (name or id) after binding
  -g, --group GROUP        drop privileges to GROUP (name or id) after binding
  -f, --unix-socket PATH   listen on a unix socket instead of TCP
  -D, --foreground         stay in the foreground (the default)
  -d, --daemon             detach and run in the background
  -k                       use ketama consistent hashing (the default; same as
                           --hash ketama)
  -v, --verbose            log more (repeat for debug: -vv)
  -h, --help               this help

more options:
  -t, --threads N          worker threads (default: one per available core)
      --hash KIND          ketama (default), modula, or magent (magent's own
                           default hash, to keep an existing magent cache)
      --connect-timeout D  time to connect to a server (default 300ms)
      --timeout D          time for a server to answer (default 500ms)
      --failure-limit N    consecutive failures that mark a server down (default 3)
      --enable-flush-all   let clients run flush_all, which empties every server
                           (refused by default: CLIENT_ERROR flush_all not allowed)
      --no-miss-fallback   do not ask the backup when the primary misses
      --auto-eject         without backups: while a server is down, its keys go
                           to the next server on the ring (twemproxy's
                           auto_eject_hosts); it is invalidated before it
                           takes them back
      --no-resync          do not copy a restarted server's items back from the
                           other tier (by hand: `memrelay resync host:port`)
      --resync-rate N      items per second a resync copies (default 5000)
      --shutdown-timeout D on SIGTERM, how long clients get to finish before
                           they are closed (default 10s); SIGINT stops at once
      --metrics ADDR       serve /metrics (Prometheus), /healthz and /readyz over
                           HTTP on ADDR, e.g. 127.0.0.1:9150
      --handoff PATH       zero-downtime restart: a memrelay started with the same
                           PATH takes over the listening sockets of the one
                           running, which then drains and exits
      --unix-mode MODE     permissions of the unix socket, octal (default 0700)
      --max-value-size N   largest value in bytes (default 1048576, as memcached -I)
      --max-keys N         most keys in one get (default 100000)
      --max-pipeline N     requests one client may have outstanding before it is
                           not read any more (default 1024)
      --max-client-buffer N  reply bytes a client may be owed (queued to write,
                           or held for requests not yet answered) before it is
                           not read any more (default 4194304)
      --max-reply-size N   largest reply buffered for one request; a get whose
                           reply is larger gets SERVER_ERROR reply too large
                           (default 67108864, or 4 x --max-value-size if more;
                           at least --max-value-size + 32768)
      --auth-file PATH     clients must authenticate first, as with memcached -Y:
                           `set <any key> 0 0 <len>` with data `<user> <password>`
                           matching a user:password line of PATH (read at start;
                           keep it chmod 600). memrelay's own connections to the
                           servers do not authenticate
      --idle-timeout D     close a client that sent nothing for D and has nothing
                           outstanding (default: never, as memcached)
      --version            print the version

Durations are like 250ms, 2s, or a number of milliseconds.
";

/// Parses the arguments (without the program name).
pub fn parse_args<I, S>(args: I) -> Result<Action, UsageError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let args: Vec<String> = args.into_iter().map(Into::into).collect();
    let mut cfg = Config::default();
    let mut port: u16 = 11211;
    let mut listen_host = String::from("127.0.0.1");
    let mut unix: Option<PathBuf> = None;
    let mut unix_mode: u32 = 0o700;
    let mut primaries: Vec<String> = Vec::new();
    let mut backups: Vec<String> = Vec::new();
    let mut max_reply: Option<usize> = None;

    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        // Split into (flag, inline value).
        let (flag, inline): (String, Option<String>) = if let Some(long) = arg.strip_prefix("--") {
            match long.split_once('=') {
                Some((f, v)) => (format!("--{f}"), Some(v.to_string())),
                None => (arg.clone(), None),
            }
        } else if arg.starts_with('-') && arg.len() > 1 {
            let short = &arg[1..2];
            let rest = &arg[2..];
            if takes_value(short) {
                (
                    format!("-{short}"),
                    (!rest.is_empty()).then(|| rest.to_string()),
                )
            } else if !rest.is_empty() {
                // Bundled switches: -Dv means -D -v.
                for c in rest.chars() {
                    let f = format!("-{c}");
                    if takes_value(&c.to_string()) {
                        return Err(err(&f, "takes a value and cannot be bundled"));
                    }
                    if let Some(a) = switch(&f, &mut cfg)? {
                        return Ok(a);
                    }
                }
                (format!("-{short}"), None)
            } else {
                (arg.clone(), None)
            }
        } else {
            return Err(err(arg, "unexpected argument (options start with -)"));
        };

        let canonical = canonical(&flag).ok_or_else(|| err(&flag, "unknown option"))?;
        if !takes_value_canonical(canonical) {
            if inline.is_some() {
                return Err(err(&flag, "takes no value"));
            }
            if let Some(a) = switch(canonical, &mut cfg)? {
                return Ok(a);
            }
            continue;
        }
        let value = match inline {
            Some(v) => v,
            None => {
                let v = args
                    .get(i)
                    .cloned()
                    .ok_or_else(|| err(&flag, "needs a value"))?;
                i += 1;
                v
            }
        };
        let f = flag.as_str();
        match canonical {
            "-p" => port = parse_num(f, &value, 1, 65535)? as u16,
            "-l" => {
                listen_host = value
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string()
            }
            "-s" => primaries.push(value),
            "-b" => backups.push(value),
            "-n" => cfg.max_conns = parse_num(f, &value, 1, 10_000_000)? as usize,
            "-i" => cfg.backend_conns = parse_num(f, &value, 1, 1_000_000)?.min(64) as usize,
            "-u" => cfg.user = Some(value),
            "-g" => cfg.group = Some(value),
            "-f" => unix = Some(PathBuf::from(value)),
            "-t" => cfg.threads = parse_num(f, &value, 1, 1024)? as usize,
            "--hash" => {
                cfg.hash = HashKind::parse(&value).ok_or_else(|| {
                    err(
                        f,
                        &format!("'{value}' is not one of ketama, modula, magent"),
                    )
                })?
            }
            "--connect-timeout" => cfg.connect_timeout = parse_dur(f, &value)?,
            "--timeout" => cfg.timeout = parse_dur(f, &value)?,
            "--failure-limit" => cfg.failure_limit = parse_num(f, &value, 1, 1000)? as u32,
            "--resync-rate" => cfg.resync_rate = parse_num(f, &value, 1, 10_000_000)?,
            "--shutdown-timeout" => cfg.shutdown_timeout = parse_dur(f, &value)?,
            "--handoff" => cfg.handoff = Some(PathBuf::from(value)),
            "--max-pipeline" => cfg.max_pipeline = parse_num(f, &value, 1, 1_000_000)? as usize,
            "--max-client-buffer" => {
                cfg.max_client_buffer = parse_num(f, &value, 4096, 1 << 32)? as usize
            }
            "--max-reply-size" => max_reply = Some(parse_num(f, &value, 1, 1 << 40)? as usize),
            "--idle-timeout" => cfg.idle_timeout = Some(parse_dur(f, &value)?),
            "--auth-file" => {
                let (creds, warning) =
                    Credentials::load(std::path::Path::new(&value)).map_err(|m| err(f, &m))?;
                cfg.auth = Some(std::sync::Arc::new(creds));
                cfg.warnings.extend(warning);
            }
            "--metrics" => {
                cfg.metrics = Some(
                    value
                        .to_socket_addrs()
                        .ok()
                        .and_then(|mut a| a.next())
                        .ok_or_else(|| {
                            err(
                                f,
                                &format!("'{value}' is not an address like 127.0.0.1:9150"),
                            )
                        })?,
                )
            }
            "--unix-mode" => {
                unix_mode = u32::from_str_radix(&value, 8)
                    .ok()
                    .filter(|m| *m <= 0o777)
                    .ok_or_else(|| err(f, &format!("'{value}' is not an octal mode like 0700")))?
            }
            "--max-value-size" => {
                cfg.limits.max_value_len = parse_num(f, &value, 1, 1 << 30)? as usize
            }
            "--max-keys" => cfg.limits.max_keys = parse_num(f, &value, 1, 10_000_000)? as usize,
            other => return Err(err(other, "unknown option")),
        }
    }

    if primaries.is_empty() {
        return Err(err(
            "-s",
            "at least one primary server is required (-s host:port)",
        ));
    }
    for s in &primaries {
        cfg.primaries
            .push(ServerAddr::parse(s).map_err(|m| err("-s", &m))?);
    }
    for b in &backups {
        cfg.backups
            .push(ServerAddr::parse(b).map_err(|m| err("-b", &m))?);
    }
    check_duplicates(&cfg)?;
    let least_reply = cfg.limits.max_value_len + REPLY_HEADROOM;
    cfg.max_reply_size = match max_reply {
        Some(n) if n < least_reply => {
            return Err(err(
                "--max-reply-size",
                &format!(
                    "{n} cannot hold one largest value: it must be at least \
                     --max-value-size + {REPLY_HEADROOM} = {least_reply}"
                ),
            ))
        }
        Some(n) => n,
        None => default_max_reply(cfg.limits.max_value_len),
    };
    if cfg.auto_eject && !cfg.backups.is_empty() {
        return Err(err(
            "--auto-eject",
            "only without backups: with -b, a dead primary's keys are served by their backup",
        ));
    }
    cfg.listen = match unix {
        Some(path) => vec![Listen::Unix {
            path,
            mode: unix_mode,
        }],
        None => {
            let addr: SocketAddr = (listen_host.as_str(), port)
                .to_socket_addrs()
                .map_err(|e| err("-l", &format!("'{listen_host}': {e}")))?
                .next()
                .ok_or_else(|| err("-l", &format!("'{listen_host}' has no address")))?;
            vec![Listen::Tcp(addr)]
        }
    };
    Ok(Action::Run(Box::new(cfg)))
}

/// Applies a switch (a flag without value). Returns an action that ends
/// parsing (help, version).
fn switch(flag: &str, cfg: &mut Config) -> Result<Option<Action>, UsageError> {
    match canonical(flag).ok_or_else(|| err(flag, "unknown option"))? {
        "-h" => return Ok(Some(Action::Help)),
        "--version" => return Ok(Some(Action::Version)),
        "-D" => cfg.daemonize = false,
        "-d" => cfg.daemonize = true,
        "-v" => cfg.verbosity = cfg.verbosity.saturating_add(1),
        "-k" => cfg.hash = HashKind::Ketama,
        "--no-miss-fallback" => cfg.miss_fallback = false,
        "--auto-eject" => cfg.auto_eject = true,
        "--no-resync" => cfg.resync = false,
        "--enable-flush-all" => cfg.flush_enabled = true,
        other => return Err(err(other, "needs a value")),
    }
    Ok(None)
}

/// Maps every spelling of a flag to one canonical name.
fn canonical(flag: &str) -> Option<&'static str> {
    Some(match flag {
        "-p" | "--port" => "-p",
        "-l" | "--listen" => "-l",
        "-s" | "--server" => "-s",
        "-b" | "--backup" => "-b",
        "-n" | "--max-conns" => "-n",
        "-i" | "--backend-conns" => "-i",
        "-u" | "--user" => "-u",
        "-g" | "--group" => "-g",
        "-f" | "--unix-socket" => "-f",
        "-t" | "--threads" => "-t",
        "-D" | "--foreground" => "-D",
        "-d" | "--daemon" => "-d",
        "-v" | "--verbose" => "-v",
        "-k" => "-k",
        "-h" | "--help" => "-h",
        "--version" => "--version",
        "--hash" => "--hash",
        "--connect-timeout" => "--connect-timeout",
        "--timeout" => "--timeout",
        "--failure-limit" => "--failure-limit",
        "--no-miss-fallback" => "--no-miss-fallback",
        "--auto-eject" => "--auto-eject",
        "--no-resync" => "--no-resync",
        "--enable-flush-all" => "--enable-flush-all",
        "--resync-rate" => "--resync-rate",
        "--shutdown-timeout" => "--shutdown-timeout",
        "--handoff" => "--handoff",
        "--max-pipeline" => "--max-pipeline",
        "--max-client-buffer" => "--max-client-buffer",
        "--max-reply-size" => "--max-reply-size",
        "--idle-timeout" => "--idle-timeout",
        "--auth-file" => "--auth-file",
        "--metrics" => "--metrics",
        "--unix-mode" => "--unix-mode",
        "--max-value-size" => "--max-value-size",
        "--max-keys" => "--max-keys",
        _ => return None,
    })
}

fn takes_value(short: &str) -> bool {
    matches!(
        short,
        "p" | "l" | "s" | "b" | "n" | "i" | "u" | "g" | "f" | "t"
    )
}

fn takes_value_canonical(c: &str) -> bool {
    !matches!(
        c,
        "-D" | "-d"
            | "-v"
            | "-k"
            | "-h"
            | "--version"
            | "--no-miss-fallback"
            | "--auto-eject"
            | "--no-resync"
            | "--enable-flush-all"
    )
}

fn err(flag: &str, message: &str) -> UsageError {
    UsageError {
        flag: flag.to_string(),
        message: message.to_string(),
    }
}

fn parse_num(flag: &str, v: &str, min: u64, max: u64) -> Result<u64, UsageError> {
    v.parse::<u64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| err(flag, &format!("'{v}' is not a number from {min} to {max}")))
}

fn parse_dur(flag: &str, v: &str) -> Result<std::time::Duration, UsageError> {
    parse_duration(v).ok_or_else(|| err(flag, &format!("'{v}' is not a duration like 250ms or 2s")))
}

fn check_duplicates(cfg: &Config) -> Result<(), UsageError> {
    let all: Vec<&ServerAddr> = cfg.servers().collect();
    for (i, a) in all.iter().enumerate() {
        for b in &all[..i] {
            if a.addr == b.addr {
                let flag = if i < cfg.primaries.len() { "-s" } else { "-b" };
                return Err(err(
                    flag,
                    &format!("'{}' is listed twice (as '{}' too)", a.name, b.name),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Config, UsageError> {
        match parse_args(args.iter().copied())? {
            Action::Run(c) => Ok(*c),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn magent_seed_line_without_backup() {
        let c = run(&[
            "-u",
            "root",
            "-n",
            "51200",
            "-l",
            "127.0.0.1",
            "-p",
            "12000",
            "-s",
            "127.0.0.1:11211",
            "-s",
            "127.0.0.1:11212",
        ])
        .unwrap();
        assert_eq!(c.max_conns, 51200);
        assert_eq!(
            c.listen,
            vec![Listen::Tcp("127.0.0.1:12000".parse().unwrap())]
        );
        assert_eq!(c.primaries.len(), 2);
        assert_eq!(c.user.as_deref(), Some("root"));
    }

    #[test]
    fn getopt_conventions() {
        let c = run(&[
            "-p12000",
            "-Dvv",
            "-s127.0.0.1:1",
            "--hash=magent",
            "--timeout",
            "2s",
        ])
        .unwrap();
        assert_eq!(c.verbosity, 2);
        assert_eq!(c.hash, HashKind::Magent);
        assert_eq!(c.timeout, std::time::Duration::from_secs(2));
        assert!(matches!(parse_args(["-h"]), Ok(Action::Help)));
    }

    #[test]
    fn reply_cap_follows_the_value_size() {
        let cap = |extra: &[&str]| {
            let args: Vec<&str> = ["-s", "127.0.0.1:1"].iter().chain(extra).copied().collect();
            run(&args).map(|c| c.max_reply_size)
        };
        assert_eq!(cap(&[]), Ok(64 << 20));
        assert_eq!(cap(&["--max-value-size", "67108864"]), Ok(256 << 20));
        assert_eq!(cap(&["--max-reply-size", "2097152"]), Ok(2 << 20));
        let least = ((1 << 20) + REPLY_HEADROOM).to_string();
        assert_eq!(
            cap(&["--max-reply-size", &least]),
            Ok((1 << 20) + REPLY_HEADROOM)
        );
    }

    #[test]
    fn errors_name_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["-x"], "-x"),
            (&["-p"], "-p"),
            (&["-p", "abc", "-s", "a:1"], "-p"),
            (&["-p", "70000", "-s", "a:1"], "-p"),
            (&[], "-s"),
            (&["-s", "127.0.0.1"], "-s"),
            (&["-s", "127.0.0.1:1", "-s", "127.0.0.1:1"], "-s"),
            (&["-s", "127.0.0.1:1", "--hash", "crc"], "--hash"),
            (&["-s", "127.0.0.1:1", "stray"], "stray"),
            (&["-s", "127.0.0.1:1", "--timeout", "soon"], "--timeout"),
            (
                &["-s", "127.0.0.1:1", "--max-reply-size", "1048576"],
                "--max-reply-size",
            ),
        ];
        for (args, flag) in cases {
            let e = run(args).unwrap_err();
            assert_eq!(e.flag, *flag, "{args:?}: {e}");
        }
    }
}
