//! Configuration: one validated, immutable [`Config`] built from a TOML
//! file (`--config`, [`file`]) and the command line (magent-compatible flags
//! plus long options, [`cli`]) applied on top of it.
//!
//! Everything here is checked before a socket is bound: an operator who
//! mistypes a flag or a key gets one line naming it (and the file) and exit
//! code 64 (`EX_USAGE`), never a half-started proxy. Both sources go through
//! the same setters ([`settings`]) and value parsers (below), so a value means
//! the same, and is refused the same way, wherever it is written.

pub(crate) mod auth;
pub mod cli;
pub(crate) mod file;
pub(crate) mod fleet;
mod routing;
mod settings;
mod summary;
pub(crate) mod tls;

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use memrelay_protocol::Limits;

/// How keys are spread over the servers of one tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashKind {
    /// Consistent hashing, byte-for-byte twemproxy's `distribution: ketama`
    /// with `hash: md5` (and libmemcached's for ports other than 11211).
    Ketama,
    /// MD5-based key hash modulo the number of servers (twemproxy's
    /// `distribution: modula` with `hash: md5`).
    Modula,
    /// magent's default: djb2-style hash over signed chars, modulo N.
    Magent,
}

impl HashKind {
    pub(crate) fn parse(s: &str) -> Option<HashKind> {
        match s {
            "ketama" => Some(HashKind::Ketama),
            "modula" => Some(HashKind::Modula),
            "magent" => Some(HashKind::Magent),
            _ => None,
        }
    }
}

impl fmt::Display for HashKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HashKind::Ketama => "ketama",
            HashKind::Modula => "modula",
            HashKind::Magent => "magent",
        })
    }
}

/// How log lines are written to standard error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// For a person at a terminal (or journald, which timestamps itself).
    Text,
    /// One JSON object a line, for log collectors.
    Json,
}

impl LogFormat {
    pub(crate) fn parse(s: &str) -> Option<LogFormat> {
        match s {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// Where a setting was written, so that an error can point at it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A command-line flag, as the operator spelled it (`-s`, `--timeout`).
    Flag(String),
    /// A key of the configuration file (`pools.primaries[1]`).
    Key { file: PathBuf, key: String },
    /// The configuration file as a whole (missing, unreadable, not TOML).
    File(PathBuf),
}

impl Origin {
    pub(crate) fn key(file: &Path, key: impl Into<String>) -> Origin {
        Origin::Key {
            file: file.to_path_buf(),
            key: key.into(),
        }
    }

    pub(crate) fn is_flag(&self) -> bool {
        matches!(self, Origin::Flag(_))
    }
}

/// A configuration mistake: where it is and what is wrong. One line when
/// displayed, so that it is the first thing an operator reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub origin: Origin,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(origin: &Origin, message: impl Into<String>) -> ConfigError {
        ConfigError {
            origin: origin.clone(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Origin::Flag(flag) => write!(f, "memrelay: {flag}: {}", self.message),
            Origin::Key { file, key } => {
                write!(f, "memrelay: {}: {key}: {}", file.display(), self.message)
            }
            Origin::File(file) => write!(f, "memrelay: {}: {}", file.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// A memcached server as the operator named it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerAddr {
    /// `host:port` exactly as given (brackets kept for IPv6). Used in logs,
    /// `stats`, and as the ketama name so other proxies and clients agree.
    pub name: String,
    pub host: String,
    pub port: u16,
    /// Resolved at start-up; the first address is used.
    pub addr: SocketAddr,
    /// Share of keys relative to the other servers of its tier
    /// (twemproxy's `host:port:weight`; 1 unless given).
    pub weight: u32,
    /// twemproxy's server name (`host:port:weight name`): ketama hashes it
    /// instead of the address, so proxies that reach a server by
    /// different addresses (a sidecar, a NAT, a host replaced under a new
    /// IP) still agree on where each key goes.
    pub label: Option<String>,
}

impl ServerAddr {
    /// Parses `host:port`, `[v6]:port`, either with an optional `:weight`
    /// and then an optional ` name` (twemproxy's syntax), resolving the
    /// host. The name (logs, `stats`, ketama) leaves the weight out, as
    /// twemproxy's does.
    pub(crate) fn parse(given: &str) -> Result<ServerAddr, String> {
        let given = given.trim();
        let (given, label) = match given.split_once(char::is_whitespace) {
            Some((addr, label)) => {
                let label = label.trim();
                if label.split_whitespace().count() != 1 || !label.is_ascii() {
                    return Err(format!(
                        "'{given}': a server name is one word of printable ASCII"
                    ));
                }
                (addr, Some(label.to_string()))
            }
            None => (given, None),
        };
        let (s, weight) = match given.rsplit_once(':') {
            Some((head, w))
                if split_host_port(head).is_some()
                    && !w.is_empty()
                    && w.bytes().all(|b| b.is_ascii_digit()) =>
            {
                let weight = w
                    .parse()
                    .ok()
                    .filter(|w| (1..=10_000).contains(w))
                    .ok_or_else(|| format!("'{given}': weight must be 1-10000"))?;
                (head, weight)
            }
            _ => (given, 1),
        };
        let (host, port) =
            split_host_port(s).ok_or_else(|| format!("'{given}' is not host:port"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("'{s}': port must be 1-65535"))?;
        if host.is_empty() {
            return Err(format!("'{s}': missing host"));
        }
        let addr = (host, port)
            .to_socket_addrs()
            .map_err(|e| format!("'{s}': cannot resolve host: {e}"))?
            .next()
            .ok_or_else(|| format!("'{s}': host has no address"))?;
        Ok(ServerAddr {
            name: s.to_string(),
            host: host.to_string(),
            port,
            addr,
            weight,
            label,
        })
    }

    /// The string ketama hashes for this server: its name when it has one;
    /// else its address, where twemproxy (and libmemcached) leave out the
    /// port when it is memcached's default, 11211.
    pub fn ketama_name(&self) -> String {
        if let Some(label) = &self.label {
            label.clone()
        } else if self.port == 11211 {
            let host = self
                .name
                .rsplit_once(':')
                .map(|(h, _)| h)
                .unwrap_or(&self.name);
            host.to_string()
        } else {
            self.name.clone()
        }
    }
}

/// Splits `host:port` / `[v6]:port`; `None` when there is no port.
fn split_host_port(s: &str) -> Option<(&str, &str)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = after.strip_prefix(':')?;
        return Some((host, port));
    }
    let (host, port) = s.rsplit_once(':')?;
    if host.contains(':') {
        // A bare IPv6 address with a port is ambiguous: require brackets.
        return None;
    }
    Some((host, port))
}

/// Where memrelay accepts clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix { path: PathBuf, mode: u32 },
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix { path, mode } => write!(f, "unix:{} (mode {mode:o})", path.display()),
        }
    }
}

/// The validated configuration the proxy runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: Vec<Listen>,
    /// `-s`: primaries, in order (order matters for `modula` and `magent`).
    pub primaries: Vec<ServerAddr>,
    /// `-b`: backups, the first backup tier.
    pub backups: Vec<ServerAddr>,
    /// `--backup-tier`: further backup tiers, each a list, in order (a key
    /// is copied to one server of every tier; reads and writes fall back
    /// tier by tier). At most three backup tiers in all.
    pub more_tiers: Vec<Vec<ServerAddr>>,
    pub hash: HashKind,
    /// `-n`: most client connections at once.
    pub max_conns: usize,
    pub threads: usize,
    /// `-i`: persistent connections per server, per worker thread.
    pub backend_conns: usize,
    pub connect_timeout: Duration,
    /// Longest wait for a server's reply before the request fails.
    pub timeout: Duration,
    /// Consecutive failures that mark a server down.
    pub failure_limit: u32,
    /// Ask the backup when the primary misses (HA read fallback).
    pub miss_fallback: bool,
    /// Without backups: serve a dead server's keys from the next server on
    /// the ring (twemproxy's `auto_eject_hosts`).
    pub auto_eject: bool,
    /// Copy a restarted server's items back from the other tier.
    pub resync: bool,
    /// Let clients run `flush_all`, which empties every server.
    pub flush_enabled: bool,
    /// Requests one client may have outstanding before it is not read.
    pub max_pipeline: usize,
    /// Reply bytes a client may be owed before it is not read.
    pub max_client_buffer: usize,
    /// Largest reply buffered for one request (see [`default_max_reply`]).
    pub max_reply_size: usize,
    /// `--tls-cert` and `--tls-key`: every TCP listener speaks TLS.
    pub tls: Option<tls::Tls>,
    /// `--server-tls-ca` (and the rest): every connection to a server
    /// speaks TLS.
    pub server_tls: Option<tls::ServerTls>,
    /// `--auth-file`: clients must authenticate (memcached's `-Y`).
    pub auth: Option<std::sync::Arc<auth::Credentials>>,
    /// Things worth an operator's attention found while reading the
    /// configuration, logged once logging is up.
    pub warnings: Vec<String>,
    /// Close clients idle this long (off by default, as in memcached).
    pub idle_timeout: Option<Duration>,
    /// Close a client owed replies that takes none for this long.
    pub write_timeout: Duration,
    /// Close a client not yet authenticated (or, over TLS, not done with
    /// its handshake) that sends nothing for this long.
    pub handshake_timeout: Duration,
    /// Bytes all clients may hold in the proxy (see [`default_max_memory`]).
    pub max_memory: usize,
    /// Items per second a resync copies.
    pub resync_rate: u64,
    /// SIGTERM: longest wait for clients to finish before closing them.
    pub shutdown_timeout: Duration,
    /// Where running and starting memrelays meet to hand over the
    /// listening sockets (zero-downtime restart).
    pub handoff: Option<PathBuf>,
    /// Where the missed-key lists outlive the process (`ha::persist`).
    pub state_file: Option<PathBuf>,
    /// `--pidfile`: where the process writes its pid once it is final
    /// (after `-d` detached), made absolute at start.
    pub pidfile: Option<PathBuf>,
    /// `--log-file`: logs go to this file instead of stderr, reopened on
    /// SIGUSR1 (for logrotate); made absolute at start.
    pub log_file: Option<PathBuf>,
    /// The monitoring endpoint (`/metrics`, `/healthz`, `/readyz`).
    pub metrics: Option<SocketAddr>,
    /// `--peer` and the rest: the other memrelays of a fleet, told of the
    /// keys servers missed.
    pub fleet: Option<fleet::Fleet>,
    /// Keys remembered per server as missed while it could not be written;
    /// past this the server is flushed before it serves again.
    pub missed_keys_cap: usize,
    pub limits: Limits,
    pub user: Option<String>,
    pub group: Option<String>,
    pub daemonize: bool,
    /// 0: info, 1: debug (`-v`), 2 and more: trace (`-vv`).
    pub verbosity: u8,
    pub log_format: LogFormat,
    /// The `--config` file the settings were read from (for the summary and
    /// the start-up log line), if any.
    pub config_file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: Vec::new(),
            primaries: Vec::new(),
            backups: Vec::new(),
            more_tiers: Vec::new(),
            hash: HashKind::Ketama,
            max_conns: 4096,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            backend_conns: 1,
            connect_timeout: Duration::from_millis(300),
            timeout: Duration::from_millis(500),
            failure_limit: 3,
            miss_fallback: true,
            auto_eject: false,
            resync: true,
            flush_enabled: false,
            max_pipeline: 1024,
            max_client_buffer: 4 * 1024 * 1024,
            max_reply_size: default_max_reply(Limits::default().max_value_len),
            tls: None,
            server_tls: None,
            auth: None,
            warnings: Vec::new(),
            idle_timeout: None,
            write_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            max_memory: default_max_memory(),
            resync_rate: 5000,
            shutdown_timeout: Duration::from_secs(10),
            handoff: None,
            state_file: None,
            pidfile: None,
            log_file: None,
            metrics: None,
            fleet: None,
            missed_keys_cap: 100_000,
            limits: Limits::default(),
            user: None,
            group: None,
            daemonize: false,
            verbosity: 0,
            log_format: LogFormat::Text,
            config_file: None,
        }
    }
}

impl Config {
    /// Every server, primaries first then backups: the index space that
    /// per-server state (pools, health, stats) is kept in.
    pub(crate) fn servers(&self) -> impl Iterator<Item = &ServerAddr> {
        self.tiers().flatten()
    }

    /// File descriptors the process may need: every client, each worker's
    /// connections to every server, the main thread's (a prober and a
    /// resync per server), the metrics endpoint's scrapers, and room for
    /// the rest (listeners, the runtime's own). Each use has its own
    /// reserve, so no number of clients or scrapers can leave the server
    /// connections without a descriptor.
    pub(crate) fn fds_needed(&self) -> usize {
        let servers = self.servers().count();
        let metrics = if self.metrics.is_some() {
            METRICS_MAX_CONNS + 1
        } else {
            0
        };
        self.max_conns + servers * (self.backend_conns * self.threads + 2) + metrics + 64
    }

    /// The tiers: primaries, then each backup tier (empty ones left out).
    pub(crate) fn tiers(&self) -> impl Iterator<Item = &Vec<ServerAddr>> {
        std::iter::once(&self.primaries)
            .chain(std::iter::once(&self.backups))
            .chain(self.more_tiers.iter())
            .filter(|t| !t.is_empty())
    }

    /// Each server's tier, in `servers()` order.
    pub(crate) fn roles(&self) -> impl Iterator<Item = Tier> + '_ {
        self.tiers().enumerate().flat_map(|(i, t)| {
            // Backup tiers past the third are shown as the third (as
            // they always were).
            let tier = match i {
                0 => Tier::Primary,
                n => Tier::Backup(n.min(3) as u8),
            };
            t.iter().map(move |_| tier)
        })
    }

    /// A reload: `new` as the running proxy can take it. Settings fixed
    /// when the process started (its sockets, threads, identity, logging)
    /// keep their running values; the names of those that `new` changed
    /// are returned, for the operator to be told they wait for a restart.
    pub(crate) fn keep_restart_only(&self, mut new: Config) -> (Config, Vec<&'static str>) {
        let mut ignored = Vec::new();
        macro_rules! keep {
            ($($field:ident: $name:literal),* $(,)?) => {$(
                if new.$field != self.$field {
                    ignored.push($name);
                    new.$field = self.$field.clone();
                }
            )*};
        }
        keep!(
            listen: "listen (-l, -p, -f)",
            threads: "process.threads (-t)",
            user: "process.user (-u)",
            group: "process.group (-g)",
            daemonize: "process.daemon (-d)",
            handoff: "process.handoff (--handoff)",
            state_file: "process.state_file (--state-file)",
            pidfile: "process.pidfile (--pidfile)",
            log_file: "log.file (--log-file)",
            metrics: "metrics.listen (--metrics)",
            fleet: "fleet (--peer, --peer-listen, --peer-secret-file, --peer-timeout, --peer-confirm)",
            // A key's requests to a server keep their connection across a
            // reload (which orders them) only while the count stays.
            backend_conns: "pools.backend_conns (-i)",
            verbosity: "log.level (-v)",
            log_format: "log.format (--log-format)",
        );
        // Whether the listeners speak TLS, and whether the servers are
        // spoken to over TLS, is fixed at start (a port does not change
        // protocol under its clients). With TLS, the files were read again
        // with the rest: new clients, and new connections to servers, get
        // the renewed certificates.
        if new.tls.is_some() != self.tls.is_some() {
            ignored.push("tls on or off (--tls-cert, --tls-key)");
            new.tls = self.tls.clone();
        }
        if new.server_tls.is_some() != self.server_tls.is_some() {
            ignored.push("server_tls on or off (--server-tls-ca)");
            new.server_tls = self.server_tls.clone();
        }
        // Sessions decide at accept whether they must authenticate: turned
        // on by a reload, it would leave every connected client in without
        // a password. New credentials (the file read again) apply to the
        // clients that authenticate after the reload.
        if new.auth.is_some() != self.auth.is_some() {
            ignored.push("authentication on or off (process.auth_file, --auth-file)");
            new.auth = self.auth.clone();
        }
        (new, ignored)
    }
}

/// What a reply carrying one value may hold beyond the value: a VALUE or
/// `VA` line (memrelay accepts reply lines up to 8 KiB), the slack memrelay
/// allows a server's value over `--max-value-size` (1 KiB), the closing
/// `END` or `MN` line, and room to spare. `--max-reply-size` may not be
/// smaller than one largest value plus this, so any single value can be
/// read whatever the setting.
pub(crate) const REPLY_HEADROOM: usize = 32 * 1024;

/// A server's place in the chain of replicas, as `stats`, `/metrics` and
/// the logs name it: `primary`, `backup` (`-b`), `backup2`, `backup3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tier {
    Primary,
    /// The n-th backup tier, from 1.
    Backup(u8),
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tier::Primary => f.write_str("primary"),
            Tier::Backup(1) => f.write_str("backup"),
            Tier::Backup(n) => write!(f, "backup{n}"),
        }
    }
}

/// Most scrapers the metrics endpoint (`--metrics`) serves at once.
/// Prometheus keeps one connection per target; a few more leave room for
/// health checks and a person with curl. Declared here because the file
/// descriptors they take are counted here (`Config::fds_needed`).
pub(crate) const METRICS_MAX_CONNS: usize = 16;

/// The default `--max-reply-size`: 64 MiB, or four of the largest values
/// if `--max-value-size` makes that more.
///
/// Why 64 MiB: it bounds what one request can make memrelay buffer (without
/// it, `get k k k ...` naming a 1 MiB item 100,000 times would be 100 GB),
/// while no ordinary multi-get comes near it: that is 64 values of
/// memcached's largest default size in one reply, where typical replies are
/// kilobytes. What one worker can hold for replies in the making is this
/// cap per server connection, so it must stay far below a proxy host's
/// memory. A larger `--max-value-size` raises it so that a few of the
/// largest values still fit in one reply.
pub(crate) fn default_max_reply(max_value_len: usize) -> usize {
    (64 << 20).max(max_value_len.saturating_mul(4))
}

/// The default `--max-memory`: half the machine's memory (the rest for the
/// servers on the same host, the kernel's buffers, and the proxy's own
/// structures), so a flood of clients is shed with `SERVER_ERROR out of
/// memory` before the host swaps. 1 GiB if the size cannot be read.
pub(crate) fn default_max_memory() -> usize {
    crate::sys::physical_memory().map_or(1 << 30, |bytes| bytes / 2)
}

/// Parses a duration: `250ms`, `2s`, or a bare number of milliseconds.
pub(crate) fn parse_duration(s: &str) -> Option<Duration> {
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else {
        (s, 1)
    };
    let n: u64 = num.parse().ok()?;
    let ms = n.checked_mul(mult)?;
    (ms > 0).then(|| Duration::from_millis(ms))
}

// The value parsers every source shares. Each returns the message of what is
// wrong; the caller knows which flag or key to name.

/// A whole number within `min..=max`.
pub(crate) fn number(v: &str, min: u64, max: u64) -> Result<u64, String> {
    v.parse::<u64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| format!("'{v}' is not a number from {min} to {max}"))
}

/// A duration (see [`parse_duration`]).
pub(crate) fn duration(v: &str) -> Result<Duration, String> {
    parse_duration(v).ok_or_else(|| format!("'{v}' is not a duration like 250ms or 2s"))
}

/// A TCP port to listen on.
pub(crate) fn port(v: &str) -> Result<u16, String> {
    number(v, 1, 65535).map(|p| p as u16)
}

/// A permission mode in octal, like `0700`.
pub(crate) fn unix_mode(v: &str) -> Result<u32, String> {
    u32::from_str_radix(v, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("'{v}' is not an octal mode like 0700"))
}

/// The address to listen on for `host` (an address or a name, brackets
/// allowed around IPv6) and `port`, resolved now.
pub(crate) fn listen_addr(host: &str, port: u16) -> Result<SocketAddr, String> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("'{host}': {e}"))?
        .next()
        .ok_or_else(|| format!("'{host}' has no address"))
}

/// A warning to log when a file of secrets (`--auth-file`, the fleet's
/// secret) is readable by others than its owner.
pub(crate) fn readable_by_others(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o777)
        .filter(|mode| mode & 0o044 != 0)
        .map(|mode| {
            format!(
                "{} is readable by group or others (mode {mode:o}); chmod 600 it",
                path.display()
            )
        })
}

/// An address like `127.0.0.1:9150` (the metrics endpoint), resolved now;
/// a port alone is on loopback.
pub(crate) fn socket_addr(v: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = v.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    v.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| format!("'{v}' is not an address like 127.0.0.1:9150"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses() {
        let s = ServerAddr::parse("127.0.0.1:11212").unwrap();
        assert_eq!(s.port, 11212);
        assert_eq!(s.ketama_name(), "127.0.0.1:11212");
        assert_eq!(
            ServerAddr::parse("127.0.0.1:11211").unwrap().ketama_name(),
            "127.0.0.1"
        );
        assert_eq!(
            ServerAddr::parse("[::1]:11300").unwrap().addr,
            "[::1]:11300".parse().unwrap()
        );
        assert!(ServerAddr::parse("localhost:11211").is_ok());
        assert!(ServerAddr::parse("127.0.0.1").is_err());
        assert!(ServerAddr::parse("127.0.0.1:0").is_err());
        assert!(ServerAddr::parse("127.0.0.1:99999").is_err());
        assert!(ServerAddr::parse("::1:11211").is_err());
        assert!(ServerAddr::parse(":11211").is_err());
        let named = ServerAddr::parse("127.0.0.1:11212:3 cache-a").unwrap();
        assert_eq!(
            (named.name.as_str(), named.weight, named.ketama_name()),
            ("127.0.0.1:11212", 3, "cache-a".to_string())
        );
        assert_eq!(
            ServerAddr::parse(" 127.0.0.1:11211  b ")
                .unwrap()
                .ketama_name(),
            "b"
        );
        assert!(ServerAddr::parse("127.0.0.1:11211:1 two words").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("40"), Some(Duration::from_millis(40)));
        assert_eq!(parse_duration("0"), None);
        assert_eq!(parse_duration("x"), None);
    }
}
