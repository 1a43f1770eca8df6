//! The command line: magent's flags with magent's meaning, plus long options.
//!
//! Hand-written rather than generated so that the error for a bad argument is
//! exactly one line naming the flag (then the usage line), and so that
//! getopt's conventions that magent users rely on keep working: `-p12000`,
//! `-p 12000`, bundled switches like `-Dv`, and `--long=value`.
//!
//! The arguments are read in two steps: first their shape (known flag, value
//! present), then, after the `--config` file wherever it was named, their
//! values, on top of the file's ([`super::settings`]).

use std::path::PathBuf;

use super::settings::{Draft, Value};
use super::{Config, ConfigError, Origin};

/// What the command line asks for.
#[derive(Debug)]
pub enum Action {
    Run(Box<Config>),
    /// `--check-config`: the configuration is valid; show it and exit.
    Check(Box<Config>),
    Help,
    Version,
}

/// The exit code for usage errors (`EX_USAGE` from sysexits.h).
pub const EXIT_USAGE: i32 = 64;

pub const USAGE_LINE: &str =
    "usage: memrelay [--config FILE] [-p port] [-l addr] -s host:port [-s host:port ...] [-b host:port ...] [options] (-h for help)";

pub const HELP: &str = "\
memrelay: a high-availability memcached proxy, a drop-in successor to magent.

Keys are spread over the primary servers (-s); with backup servers (-b),
every write is copied to the key's backup too, and reads are served from the
backup while its primary is down or has lost the key.

usage: memrelay [options] -s host:port [-s host:port ...] [-b host:port ...]
       memrelay --config FILE [options]

magent-compatible options:
  -p, --port PORT          TCP port to listen on (default 11211)
  -l, --listen ADDR        address to listen on (default 127.0.0.1; magent
                           listened on every interface: use -l 0.0.0.0 or -l ::
                           to do that on purpose)
  -s, --server HOST:PORT   a primary memcached server; repeat for more, order
                           matters for --hash modula and magent; HOST:PORT:W
                           gives it weight W (twemproxy's syntax: W shares of
                           the keys; ketama and modula only); 'HOST:PORT:W NAME'
                           (one argument) names it: ketama hashes the name,
                           as twemproxy does, not the address
  -b, --backup HOST:PORT   a backup memcached server; repeat for more (a weight
                           too, among the backups)
      --backup-tier LIST   a further backup tier, after the -b one: servers
                           HOST:PORT[:W] separated by commas; repeat for a
                           third (every write is copied to one server of each
                           tier; reads and writes fall back tier by tier)
  -n, --max-conns N        most client connections at once (default 4096)
  -i, --backend-conns N    persistent connections kept per server per thread,
                           each carrying many requests (default 1, max 64)
  -u, --user USER          drop privileges to USER (name or id) after binding
  -g, --group GROUP        drop privileges to GROUP (name or id) after binding
  -f, --unix-socket PATH   listen on a unix socket instead of TCP
  -D, --foreground         stay in the foreground (the default)
  -d, --daemon             detach and run in the background (with -d, logs go
                           nowhere unless --log-file says where)
  -k                       use ketama consistent hashing (the default; same as
                           --hash ketama)
  -v, --verbose            log more: -v debug, -vv trace
  -h, --help               this help

configuration file:
      --config FILE        read settings from a TOML file first; flags given
                           too override it (a -s, -b, or -l/-p/-f replaces the
                           file's list rather than adding to it)
      --check-config       validate the file and flags, print the effective
                           configuration, and exit (0 if valid, 64 if not)
                           without binding anything

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
                           other tier, nor the values a server missed once their
                           keys are deleted on it (by hand: `memrelay resync
                           host:port`)
      --resync-rate N      items per second a resync copies (default 5000)
      --shutdown-timeout D on SIGTERM, how long clients get to finish before
                           they are closed (default 10s); SIGINT stops at once
      --metrics ADDR       serve /metrics (Prometheus), /healthz and /readyz over
                           HTTP on ADDR, e.g. 127.0.0.1:9150 (a port alone:
                           on 127.0.0.1); with --auth-file, /metrics asks for
                           one of its users (HTTP basic authentication)
      --handoff PATH       zero-downtime restart: a memrelay started with the same
                           PATH takes over the listening sockets of the one
                           running, which serves until the new one does, then
                           drains and exits
      --state-file PATH    where memrelay keeps which keys each server missed
                           across its own restarts (docs/ha.md, Restarts of
                           memrelay); without it a restart forgets them
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
      --tls-cert PATH      serve clients over TLS on every TCP listener (unix
                           sockets stay plain): PATH is the PEM certificate
                           chain, server certificate first; read at start
                           and at each reload
      --tls-key PATH       the PEM private key of --tls-cert (keep it chmod 600)
      --tls-client-ca PATH clients must present a certificate signed by a CA
                           of this PEM file (mutual TLS)
      --server-tls-ca PATH talk TLS to every server (memcached -Z), trusting the
                           server certificates signed by a CA of this PEM file;
                           read at start and at each reload
      --server-tls-cert PATH  the PEM certificate memrelay shows the servers
                           (for memcached -o ssl_verify_mode=2); needs
                           --server-tls-key
      --server-tls-key PATH   its PEM private key (keep it chmod 600)
      --server-tls-name NAME  the name every server certificate must carry
                           (default: each server's host as given in -s/-b, an
                           IP address then being checked against the
                           certificate's IP addresses)
      --idle-timeout D     close a client that sent nothing for D and has nothing
                           outstanding (default: never, as memcached)
      --write-timeout D    close a client that is owed replies and takes none of
                           them for D (default 30s)
      --handshake-timeout D  close a client that has not authenticated (with
                           --auth-file) or not finished its TLS handshake D after
                           it connected or last sent something (default 10s)
      --max-memory N       bytes all clients together may hold in the proxy
                           (requests in flight, replies owed), shared equally by
                           the worker threads; past it new requests get
                           SERVER_ERROR out of memory (default: half the
                           machine's memory)
      --log-format FORMAT  text (default) or json: one JSON object a line
      --log-file PATH      write logs to PATH instead of stderr (appending);
                           SIGUSR1 reopens it, for logrotate
      --pidfile PATH       write the process id to PATH once started (after
                           -d detached); removed at exit
      --version            print the version

a fleet (several memrelays behind one VIP; docs/ha.md, A fleet of memrelays):
      --peer HOST:PORT     another memrelay of the fleet (repeat for each; the
                           same list on every member, which may include itself)
      --peer-listen ADDR   where the other memrelays reach this one, e.g.
                           10.0.0.1:12100
      --peer-secret-file PATH  a secret of 16 bytes or more shared by the fleet
                           (its first line; keep it chmod 600): peers prove
                           they know it before they talk
      --peer-timeout D     longest wait for a peer to take a hint before it is
                           counted down until reached again (default 200ms)
      --peer-confirm reached|majority|all  which peers must take what a
                           write went past (a server it could not reach)
                           before the write is answered: the ones reached
                           (default), more than half the fleet, or every
                           member; short of that, SERVER_ERROR
                           In a fleet, resync is off unless the file says
                           ha.resync = true (docs/ha.md explains why).

Durations are like 250ms, 2s, or a number of milliseconds.
";

/// Parses the arguments (without the program name), reading the `--config`
/// file they name, if any.
pub fn parse_args<I, S>(args: I) -> Result<Action, ConfigError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let args: Vec<String> = args.into_iter().map(Into::into).collect();
    // (flag as written, canonical name, value)
    let mut given: Vec<(String, &'static str, Option<String>)> = Vec::new();
    let mut config: Option<PathBuf> = None;
    let mut check = false;

    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        let (flag, inline) = match split_flag(arg, &mut given)? {
            Split::Flag(flag, inline) => (flag, inline),
            Split::Done(action) => return Ok(action),
        };

        let canonical = canonical(&flag).ok_or_else(|| err(&flag, "unknown option"))?;
        if !takes_value_canonical(canonical) {
            if inline.is_some() {
                return Err(err(&flag, "takes no value"));
            }
            if let Some(a) = ends_parsing(canonical) {
                return Ok(a);
            }
            if canonical == "--check-config" {
                check = true;
            } else {
                given.push((flag, canonical, None));
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
        if canonical == "--config" {
            config = Some(PathBuf::from(value));
        } else {
            given.push((flag, canonical, Some(value)));
        }
    }

    let cfg = Box::new(configure(config.as_deref(), &given)?);
    Ok(if check {
        Action::Check(cfg)
    } else {
        Action::Run(cfg)
    })
}

/// One argument, split by [`split_flag`].
enum Split {
    /// The flag as written (`-p`, `--port`) and its inline value, if any
    /// (`-p11211`, `--port=11211`).
    Flag(String, Option<String>),
    /// A switch that ends parsing (`--help`, `--version`) was found.
    Done(Action),
}

/// Splits one argument into its flag and inline value. Bundled switches
/// (`-Dv`: `-D -v`) go to `given` but the first, which is returned.
fn split_flag(
    arg: &str,
    given: &mut Vec<(String, &'static str, Option<String>)>,
) -> Result<Split, ConfigError> {
    let split = if let Some(long) = arg.strip_prefix("--") {
        match long.split_once('=') {
            Some((f, v)) => (format!("--{f}"), Some(v.to_string())),
            None => (arg.to_string(), None),
        }
    } else if arg.starts_with('-') && arg.len() > 1 {
        // By character: a non-ASCII one must get "unknown option", not
        // a slice through the middle of it.
        let width = arg[1..].chars().next().map_or(1, char::len_utf8);
        let (short, rest) = arg[1..].split_at(width);
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
                let canonical = canonical(&f).ok_or_else(|| err(&f, "unknown option"))?;
                if let Some(a) = ends_parsing(canonical) {
                    return Ok(Split::Done(a));
                }
                given.push((f, canonical, None));
            }
            (format!("-{short}"), None)
        } else {
            (arg.to_string(), None)
        }
    } else {
        return Err(err(arg, "unexpected argument (options start with -)"));
    };
    Ok(Split::Flag(split.0, split.1))
}

/// The `--config` file's settings, if one is named, then the flags on top.
fn configure(
    config: Option<&std::path::Path>,
    given: &[(String, &'static str, Option<String>)],
) -> Result<Config, ConfigError> {
    let mut draft = Draft::default();
    if let Some(path) = config {
        super::file::load(path, &mut draft)?;
    }
    for (flag, canonical, value) in given {
        let value = match value {
            Some(v) => Value::Text(v),
            None => Value::Switch(true),
        };
        draft.set(&Origin::Flag(flag.clone()), canonical, value)?;
    }
    draft.finish()
}

/// The configuration the same arguments give now, for a reload: the
/// `--config` file is read again and the flags applied on top of it, as at
/// start, and hostnames are resolved again.
pub fn reread(args: &[String]) -> Result<Config, ConfigError> {
    match parse_args(args.iter().cloned())? {
        Action::Run(cfg) | Action::Check(cfg) => Ok(*cfg),
        Action::Help | Action::Version => Err(ConfigError::new(
            &Origin::Flag("-h".into()),
            "the command line asks for no configuration",
        )),
    }
}

/// `-h` and `--version` answer at once, whatever else is on the line.
fn ends_parsing(canonical: &str) -> Option<Action> {
    match canonical {
        "-h" => Some(Action::Help),
        "--version" => Some(Action::Version),
        _ => None,
    }
}

/// Maps every spelling of a flag to one canonical name.
fn canonical(flag: &str) -> Option<&'static str> {
    Some(match flag {
        "-p" | "--port" => "-p",
        "-l" | "--listen" => "-l",
        "-s" | "--server" => "-s",
        "-b" | "--backup" => "-b",
        "--backup-tier" => "--backup-tier",
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
        "--state-file" => "--state-file",
        "--peer" => "--peer",
        "--peer-listen" => "--peer-listen",
        "--peer-secret-file" => "--peer-secret-file",
        "--peer-timeout" => "--peer-timeout",
        "--peer-confirm" => "--peer-confirm",
        "--pidfile" => "--pidfile",
        "--log-file" => "--log-file",
        "--max-pipeline" => "--max-pipeline",
        "--max-client-buffer" => "--max-client-buffer",
        "--max-reply-size" => "--max-reply-size",
        "--idle-timeout" => "--idle-timeout",
        "--write-timeout" => "--write-timeout",
        "--handshake-timeout" => "--handshake-timeout",
        "--max-memory" => "--max-memory",
        "--auth-file" => "--auth-file",
        "--metrics" => "--metrics",
        "--tls-cert" => "--tls-cert",
        "--tls-key" => "--tls-key",
        "--tls-client-ca" => "--tls-client-ca",
        "--server-tls-ca" => "--server-tls-ca",
        "--server-tls-cert" => "--server-tls-cert",
        "--server-tls-key" => "--server-tls-key",
        "--server-tls-name" => "--server-tls-name",
        "--unix-mode" => "--unix-mode",
        "--max-value-size" => "--max-value-size",
        "--max-keys" => "--max-keys",
        "--log-format" => "--log-format",
        "--config" => "--config",
        "--check-config" => "--check-config",
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
            | "--check-config"
    )
}

fn err(flag: &str, message: &str) -> ConfigError {
    ConfigError::new(&Origin::Flag(flag.to_string()), message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HashKind, Listen, REPLY_HEADROOM};

    fn run(args: &[&str]) -> Result<Config, ConfigError> {
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
    fn a_non_ascii_flag_is_an_unknown_option_not_a_panic() {
        for arg in ["-é", "-éx", "-pé"] {
            let r = run(&[arg, "-s", "127.0.0.1:1"]);
            if arg == "-pé" {
                // -p with an inline value: a bad port, said as such.
                assert!(r.is_err(), "{arg}");
                continue;
            }
            let e = r.unwrap_err().to_string();
            assert!(e.contains("unknown option"), "{arg}: {e}");
        }
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
            assert_eq!(e.origin, Origin::Flag(flag.to_string()), "{args:?}: {e}");
        }
    }
}
