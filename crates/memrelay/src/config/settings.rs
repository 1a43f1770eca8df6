//! One setting at a time, whichever source gives it: the configuration file
//! first, then the command line on top.
//!
//! Settings are named by the command line's canonical flag (`-s`,
//! `--timeout`), so a file key and its flag share one setter and one value
//! parser: they cannot drift apart. Whatever can only be checked once every
//! setting is in (servers resolved, listed twice, a primary required,
//! `--auto-eject` without backups) is checked by [`Draft::finish`], naming
//! where the offending value was written.

use std::path::{Path, PathBuf};

use super::auth::Credentials;
use super::{
    default_max_reply, duration, listen_addr, number, port, socket_addr, unix_mode, Config,
    ConfigError, HashKind, Listen, LogFormat, Origin, ServerAddr, REPLY_HEADROOM,
};

/// Where memrelay listens when nothing says otherwise (magent listened on
/// every interface; a cache open to the network by default is a risk).
pub(super) const DEFAULT_HOST: &str = "127.0.0.1";
/// memcached's own port, as magent's default.
pub(super) const DEFAULT_PORT: u16 = 11211;
/// A unix socket is for its owner unless the operator opens it up.
pub(super) const DEFAULT_UNIX_MODE: u32 = 0o700;

/// A setting's value as its source wrote it.
#[derive(Debug, Clone, Copy)]
pub(super) enum Value<'a> {
    /// What follows a flag, or a file value rendered as the flag would take it.
    Text(&'a str),
    /// A flag without a value (given: `true`), or a file's boolean.
    Switch(bool),
}

/// A configuration being put together.
#[derive(Debug, Default)]
pub(super) struct Draft {
    cfg: Config,
    /// The file read before the command line, if any (named in errors about
    /// what it lacks, and in the summary).
    file: Option<PathBuf>,
    /// The file's listeners, already resolved.
    file_listen: Vec<Listen>,
    /// The command line's listener: any of `-l`, `-p`, `-f` replaces the
    /// file's listeners with this one.
    cli_host: Option<(Origin, String)>,
    cli_port: Option<u16>,
    cli_unix: Option<PathBuf>,
    /// `--unix-mode`: for the command line's socket, or the file's.
    cli_unix_mode: Option<u32>,
    primaries: Vec<(Origin, String)>,
    backups: Vec<(Origin, String)>,
    /// `--backup-tier`: each a whole tier, `host:port[:w],host:port...`.
    more_tiers: Vec<(Origin, String)>,
    auto_eject_origin: Option<Origin>,
    /// Whether `--no-resync` (`ha.resync`) was given either way: a fleet
    /// turns resync off unless it was asked for.
    resync_given: bool,
    /// `--max-reply-size`, checked against `--max-value-size` at the end.
    max_reply: Option<(Origin, usize)>,
    /// `--tls-cert`, `--tls-key`, `--tls-client-ca`: read together at the
    /// end, when it is known whether both halves were given.
    tls_cert: Option<(Origin, PathBuf)>,
    tls_key: Option<(Origin, PathBuf)>,
    tls_client_ca: Option<(Origin, PathBuf)>,
    /// `--auth-file`, read at the end.
    auth_file: Option<(Origin, PathBuf)>,
    /// `--server-tls-*`: likewise read together at the end.
    server_tls_ca: Option<(Origin, PathBuf)>,
    server_tls_cert: Option<(Origin, PathBuf)>,
    server_tls_key: Option<(Origin, PathBuf)>,
    server_tls_name: Option<(Origin, String)>,
    /// `--peer` (each), `--peer-listen`, `--peer-secret-file`,
    /// `--peer-timeout`, `--peer-confirm`: checked together at the end.
    peers: Vec<(Origin, String)>,
    peer_listen: Option<(Origin, String)>,
    peer_secret: Option<(Origin, PathBuf)>,
    peer_timeout: Option<std::time::Duration>,
    peer_confirm: Option<(Origin, super::fleet::Confirm)>,
    /// Settings the command line gave so far: the first `-s` (or `-b`, or
    /// `-v`) replaces what the file said rather than adding to it.
    from_cli: Vec<&'static str>,
}

impl Draft {
    /// Settings that follow come from `file` (until the command line's).
    pub(super) fn read_from(&mut self, file: &Path) {
        self.file = Some(file.to_path_buf());
        self.cfg.config_file = Some(file.to_path_buf());
    }

    /// A listener from the file, resolved by the caller.
    pub(super) fn add_listener(&mut self, l: Listen) {
        self.file_listen.push(l);
    }

    /// Applies one setting, named by its canonical flag.
    pub(super) fn set(
        &mut self,
        origin: &Origin,
        name: &'static str,
        value: Value<'_>,
    ) -> Result<(), ConfigError> {
        if origin.is_flag() && !self.from_cli.contains(&name) {
            self.from_cli.push(name);
            match name {
                "-s" => self.primaries.clear(),
                "-b" => self.backups.clear(),
                "--backup-tier" => self.more_tiers.clear(),
                "--peer" => self.peers.clear(),
                "-v" => self.cfg.verbosity = 0,
                _ => {}
            }
        }
        let v = match value {
            Value::Switch(on) => return self.switch(origin, name, on),
            Value::Text(v) => v,
        };
        if self.set_deferred(origin, name, v)? {
            return Ok(());
        }
        set_value(&mut self.cfg, origin, name, v)
    }

    /// A setting kept on the draft (listeners, servers, files), resolved
    /// by [`finish`](Self::finish); false when `name` is not one.
    fn set_deferred(&mut self, origin: &Origin, name: &str, v: &str) -> Result<bool, ConfigError> {
        let fail = |m: String| ConfigError::new(origin, m);
        match name {
            "-p" => self.cli_port = Some(port(v).map_err(fail)?),
            "-l" => self.cli_host = Some((origin.clone(), v.to_string())),
            "-f" => self.cli_unix = Some(PathBuf::from(v)),
            "--unix-mode" => self.cli_unix_mode = Some(unix_mode(v).map_err(fail)?),
            "-s" => self.primaries.push((origin.clone(), v.to_string())),
            "-b" => self.backups.push((origin.clone(), v.to_string())),
            "--backup-tier" => self.more_tiers.push((origin.clone(), v.to_string())),
            "--max-reply-size" => {
                self.max_reply = Some((
                    origin.clone(),
                    number(v, 1, 1 << 40).map_err(fail)? as usize,
                ))
            }
            // Read at the end, once it is known which one counts (the
            // command line's replaces the file's without reading it).
            "--auth-file" => self.auth_file = Some((origin.clone(), PathBuf::from(v))),
            "--tls-cert" => self.tls_cert = Some((origin.clone(), PathBuf::from(v))),
            "--tls-key" => self.tls_key = Some((origin.clone(), PathBuf::from(v))),
            "--tls-client-ca" => self.tls_client_ca = Some((origin.clone(), PathBuf::from(v))),
            "--server-tls-ca" => self.server_tls_ca = Some((origin.clone(), PathBuf::from(v))),
            "--server-tls-cert" => self.server_tls_cert = Some((origin.clone(), PathBuf::from(v))),
            "--server-tls-key" => self.server_tls_key = Some((origin.clone(), PathBuf::from(v))),
            "--server-tls-name" => self.server_tls_name = Some((origin.clone(), v.to_string())),
            "--peer" => self.peers.push((origin.clone(), v.to_string())),
            "--peer-listen" => self.peer_listen = Some((origin.clone(), v.to_string())),
            "--peer-secret-file" => self.peer_secret = Some((origin.clone(), PathBuf::from(v))),
            "--peer-timeout" => self.peer_timeout = Some(duration(v).map_err(fail)?),
            "--peer-confirm" => {
                self.peer_confirm = Some((
                    origin.clone(),
                    super::fleet::Confirm::parse(v).map_err(fail)?,
                ))
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// A setting that is on or off.
    fn switch(&mut self, origin: &Origin, name: &str, on: bool) -> Result<(), ConfigError> {
        let cfg = &mut self.cfg;
        match name {
            "-D" => cfg.daemonize = !on,
            "-d" => cfg.daemonize = on,
            "-v" => cfg.verbosity = cfg.verbosity.saturating_add(1),
            "-k" => cfg.hash = HashKind::Ketama,
            "--no-miss-fallback" => cfg.miss_fallback = !on,
            "--auto-eject" => {
                cfg.auto_eject = on;
                self.auto_eject_origin = Some(origin.clone());
            }
            "--no-resync" => {
                cfg.resync = !on;
                self.resync_given = true;
            }
            "--enable-flush-all" => cfg.flush_enabled = on,
            _ => return Err(ConfigError::new(origin, "needs a value")),
        }
        Ok(())
    }

    /// Resolves what could not be checked one setting at a time.
    pub(super) fn finish(mut self) -> Result<Config, ConfigError> {
        let mut cfg = std::mem::take(&mut self.cfg);
        let origins = self.resolve_servers(&mut cfg)?;
        self.load_server_files(&mut cfg, &origins)?;
        self.check_sizes(&mut cfg)?;
        cfg.tls = self.client_tls()?;
        cfg.fleet = self.fleet(&mut cfg.warnings)?;
        if cfg.fleet.is_some() && cfg.resync {
            // A resync trusts a copy only if no write of its own process
            // touched the key meanwhile; the other members' writes it
            // cannot see, so it could bring back a key one of them deleted
            // (docs/ha.md, "A fleet of memrelays").
            if self.resync_given {
                cfg.warnings.push(
                    "resync is on in a fleet: a resync can bring back a key that another member deleted while it copied (docs/ha.md)".into(),
                );
            } else {
                cfg.resync = false;
            }
        }
        cfg.listen = self.listen()?;
        Ok(cfg)
    }

    /// The servers of every tier, resolved and checked for duplicates; the
    /// origin of each, in `Config::servers` order.
    fn resolve_servers(&self, cfg: &mut Config) -> Result<Vec<&Origin>, ConfigError> {
        if self.primaries.is_empty() {
            let (origin, how) = match &self.file {
                Some(f) => (Origin::key(f, "pools.primaries"), "pools.primaries or -s"),
                None => (Origin::Flag("-s".into()), "-s host:port"),
            };
            return Err(ConfigError::new(
                &origin,
                format!("at least one primary server is required ({how})"),
            ));
        }
        let resolve = |list: &[(Origin, String)]| -> Result<Vec<ServerAddr>, ConfigError> {
            list.iter()
                .map(|(o, s)| ServerAddr::parse(s).map_err(|m| ConfigError::new(o, m)))
                .collect()
        };
        cfg.primaries = resolve(&self.primaries)?;
        cfg.backups = resolve(&self.backups)?;
        // Further tiers: each entry a comma-separated list of servers.
        let mut tier_origins: Vec<&Origin> = Vec::new();
        for (origin, list) in &self.more_tiers {
            if self.backups.is_empty() {
                return Err(ConfigError::new(
                    origin,
                    "a further backup tier needs a first one (-b or pools.backups)",
                ));
            }
            let tier: Vec<ServerAddr> = list
                .split(',')
                .map(|s| ServerAddr::parse(s.trim()).map_err(|m| ConfigError::new(origin, m)))
                .collect::<Result<_, _>>()?;
            tier_origins.extend(std::iter::repeat_n(origin, tier.len()));
            cfg.more_tiers.push(tier);
        }
        if let Some((origin, _)) = self.more_tiers.get(2) {
            return Err(ConfigError::new(
                origin,
                "at most three backup tiers (-b and two --backup-tier)",
            ));
        }
        let origins: Vec<&Origin> = self
            .primaries
            .iter()
            .chain(self.backups.iter())
            .map(|(o, _)| o)
            .chain(tier_origins)
            .collect();
        check_duplicates(cfg, &origins)?;
        Ok(origins)
    }

    /// The client credentials and the certificates for servers, checked
    /// against the servers they are for; weights against the hash.
    fn load_server_files(&self, cfg: &mut Config, origins: &[&Origin]) -> Result<(), ConfigError> {
        if let Some((origin, path)) = &self.auth_file {
            let (creds, warning) =
                Credentials::load(path).map_err(|m| ConfigError::new(origin, m))?;
            cfg.auth = Some(std::sync::Arc::new(creds));
            cfg.warnings.extend(warning);
        }
        cfg.server_tls = super::tls::load_server(super::tls::ServerFiles {
            ca: self.server_tls_ca.as_ref().map(|(o, p)| (o, p.as_path())),
            cert: self.server_tls_cert.as_ref().map(|(o, p)| (o, p.as_path())),
            key: self.server_tls_key.as_ref().map(|(o, p)| (o, p.as_path())),
            name: self.server_tls_name.as_ref().map(|(o, n)| (o, n.as_str())),
        })?;
        if let Some(t) = &cfg.server_tls {
            // Each server's certificate is checked against its host: one
            // rustls cannot check against is refused now, not at each
            // connect.
            if let Some(i) = cfg.servers().position(|s| t.name_for(&s.host).is_none()) {
                return Err(ConfigError::new(
                    origins[i],
                    "its host cannot be checked against a certificate (not a DNS name or IP address): give --server-tls-name",
                ));
            }
        }
        if cfg.hash == HashKind::Magent {
            if let Some(i) = cfg.servers().position(|s| s.weight != 1) {
                return Err(ConfigError::new(
                    origins[i],
                    "weights need --hash ketama or modula (magent's hash has none)",
                ));
            }
        }
        Ok(())
    }

    /// `--max-reply-size` against the largest value; `--auto-eject` only
    /// without backups.
    fn check_sizes(&self, cfg: &mut Config) -> Result<(), ConfigError> {
        let least_reply = cfg.limits.max_value_len + REPLY_HEADROOM;
        cfg.max_reply_size = match &self.max_reply {
            Some((origin, n)) if *n < least_reply => {
                return Err(ConfigError::new(
                    origin,
                    format!(
                        "{n} cannot hold one largest value: it must be at least \
                         --max-value-size + {REPLY_HEADROOM} = {least_reply}"
                    ),
                ))
            }
            Some((_, n)) => *n,
            None => default_max_reply(cfg.limits.max_value_len),
        };
        if cfg.auto_eject && !cfg.backups.is_empty() {
            let origin = self
                .auto_eject_origin
                .clone()
                .unwrap_or_else(|| Origin::Flag("--auto-eject".into()));
            return Err(ConfigError::new(
                &origin,
                "only without backups: with backups, a dead primary's keys are served by their backup",
            ));
        }
        Ok(())
    }

    /// The listeners' TLS: certificate and key come together.
    fn client_tls(&self) -> Result<Option<super::tls::Tls>, ConfigError> {
        let tls =
            match (&self.tls_cert, &self.tls_key) {
                (Some((co, cert)), Some((ko, key))) => Some(super::tls::load(super::tls::Files {
                    cert: (co, cert),
                    key: (ko, key),
                    client_ca: self.tls_client_ca.as_ref().map(|(o, p)| (o, p.as_path())),
                })?),
                (Some((o, _)), None) => {
                    return Err(ConfigError::new(o, "needs --tls-key (tls.key) too"))
                }
                (None, Some((o, _))) => {
                    return Err(ConfigError::new(o, "needs --tls-cert (tls.cert) too"))
                }
                (None, None) => match &self.tls_client_ca {
                    Some((o, _)) => return Err(ConfigError::new(
                        o,
                        "needs --tls-cert and --tls-key: client certificates are checked over TLS",
                    )),
                    None => None,
                },
            };
        Ok(tls)
    }

    /// The fleet: peers need an address to be reached at and a secret;
    /// this member, if listed among the peers, is left out.
    fn fleet(
        &self,
        warnings: &mut Vec<String>,
    ) -> Result<Option<super::fleet::Fleet>, ConfigError> {
        let Some((lo, listen)) = &self.peer_listen else {
            // `--peer-confirm` alone would promise what no fleet keeps.
            let confirm = self.peer_confirm.as_ref().map(|(o, _)| o);
            let secret = self.peer_secret.as_ref().map(|(o, _)| o);
            return match self.peers.first().map(|(o, _)| o).or(secret).or(confirm) {
                Some(o) => Err(ConfigError::new(
                    o,
                    "needs --peer-listen (fleet.listen): where the other memrelays reach this one",
                )),
                None => Ok(None),
            };
        };
        let listen = socket_addr(listen).map_err(|m| ConfigError::new(lo, m))?;
        let Some((so, path)) = &self.peer_secret else {
            return Err(ConfigError::new(
                lo,
                "needs --peer-secret-file (fleet.secret_file): peers authenticate each other with it",
            ));
        };
        let (secret, warning) =
            super::fleet::Secret::load(path).map_err(|m| ConfigError::new(so, m))?;
        warnings.extend(warning);
        let mut peers: Vec<(String, std::net::SocketAddr)> = Vec::new();
        for (o, given) in &self.peers {
            let addr = socket_addr(given).map_err(|m| ConfigError::new(o, m))?;
            if addr == listen || peers.iter().any(|(_, a)| *a == addr) {
                continue;
            }
            peers.push((given.clone(), addr));
        }
        Ok(Some(super::fleet::Fleet {
            listen,
            peers,
            secret,
            timeout: self.peer_timeout.unwrap_or(super::fleet::DEFAULT_TIMEOUT),
            confirm: self
                .peer_confirm
                .as_ref()
                .map(|(_, c)| *c)
                .unwrap_or_default(),
        }))
    }

    /// The command line's listener if it named one (or the file none),
    /// else the file's.
    fn listen(self) -> Result<Vec<Listen>, ConfigError> {
        let from_cli =
            self.cli_host.is_some() || self.cli_port.is_some() || self.cli_unix.is_some();
        Ok(if from_cli || self.file_listen.is_empty() {
            match self.cli_unix {
                Some(path) => vec![Listen::Unix {
                    path,
                    mode: self.cli_unix_mode.unwrap_or(DEFAULT_UNIX_MODE),
                }],
                None => {
                    let (origin, host) = self
                        .cli_host
                        .unwrap_or_else(|| (Origin::Flag("-l".into()), DEFAULT_HOST.into()));
                    let port = self.cli_port.unwrap_or(DEFAULT_PORT);
                    let addr =
                        listen_addr(&host, port).map_err(|m| ConfigError::new(&origin, m))?;
                    vec![Listen::Tcp(addr)]
                }
            }
        } else {
            let mut listen = self.file_listen;
            if let Some(m) = self.cli_unix_mode {
                for l in &mut listen {
                    if let Listen::Unix { mode, .. } = l {
                        *mode = m;
                    }
                }
            }
            listen
        })
    }
}

/// A setting that goes straight into the configuration.
fn set_value(cfg: &mut Config, origin: &Origin, name: &str, v: &str) -> Result<(), ConfigError> {
    let fail = |m: String| ConfigError::new(origin, m);
    match name {
        "-n" => cfg.max_conns = number(v, 1, 10_000_000).map_err(fail)? as usize,
        // More than 64 connections per server per thread buys nothing
        // but file descriptors: the connections pipeline.
        "-i" => cfg.backend_conns = number(v, 1, 1_000_000).map_err(fail)?.min(64) as usize,
        "-u" => cfg.user = Some(v.to_string()),
        "-g" => cfg.group = Some(v.to_string()),
        "-t" => cfg.threads = number(v, 1, 1024).map_err(fail)? as usize,
        "--hash" => {
            cfg.hash = HashKind::parse(v)
                .ok_or_else(|| fail(format!("'{v}' is not one of ketama, modula, magent")))?
        }
        "--connect-timeout" => cfg.connect_timeout = duration(v).map_err(fail)?,
        "--timeout" => cfg.timeout = duration(v).map_err(fail)?,
        "--failure-limit" => cfg.failure_limit = number(v, 1, 1000).map_err(fail)? as u32,
        "--resync-rate" => cfg.resync_rate = number(v, 1, 10_000_000).map_err(fail)?,
        "--shutdown-timeout" => cfg.shutdown_timeout = duration(v).map_err(fail)?,
        "--handoff" => cfg.handoff = Some(PathBuf::from(v)),
        // Absolute: `-d` changes the working directory to /, and the
        // pid file is written, and the log file reopened, after that.
        "--pidfile" => cfg.pidfile = Some(std::path::absolute(v).map_err(|e| fail(e.to_string()))?),
        "--log-file" => {
            cfg.log_file = Some(std::path::absolute(v).map_err(|e| fail(e.to_string()))?)
        }
        "--state-file" => {
            cfg.state_file = Some(std::path::absolute(v).map_err(|e| fail(e.to_string()))?)
        }
        "--max-pipeline" => cfg.max_pipeline = number(v, 1, 1_000_000).map_err(fail)? as usize,
        "--max-client-buffer" => {
            cfg.max_client_buffer = number(v, 4096, 1 << 32).map_err(fail)? as usize
        }
        "--idle-timeout" => cfg.idle_timeout = Some(duration(v).map_err(fail)?),
        "--write-timeout" => cfg.write_timeout = duration(v).map_err(fail)?,
        "--handshake-timeout" => cfg.handshake_timeout = duration(v).map_err(fail)?,
        "--max-memory" => cfg.max_memory = number(v, 1 << 20, 1 << 50).map_err(fail)? as usize,
        "--metrics" => cfg.metrics = Some(socket_addr(v).map_err(fail)?),
        "--max-value-size" => {
            cfg.limits.max_value_len = number(v, 1, 1 << 30).map_err(fail)? as usize
        }
        "--max-keys" => cfg.limits.max_keys = number(v, 1, 10_000_000).map_err(fail)? as usize,
        "--log-format" => {
            cfg.log_format = LogFormat::parse(v)
                .ok_or_else(|| fail(format!("'{v}' is not one of text, json")))?
        }
        // The file's `log.level`; on the command line, -v and -vv.
        "--log-level" => {
            cfg.verbosity = match v {
                "info" => 0,
                "debug" => 1,
                "trace" => 2,
                _ => return Err(fail(format!("'{v}' is not one of info, debug, trace"))),
            }
        }
        _ => return Err(fail("takes no value".to_string())),
    }
    Ok(())
}

/// The same server listed twice (under any two names) would get every
/// write twice and skew the ring: refuse it, naming the second listing.
fn check_duplicates(cfg: &Config, origins: &[&Origin]) -> Result<(), ConfigError> {
    let all: Vec<&ServerAddr> = cfg.servers().collect();
    for (i, a) in all.iter().enumerate() {
        if let Some(b) = all[..i].iter().find(|b| b.addr == a.addr) {
            return Err(ConfigError::new(
                origins[i],
                format!("'{}' is listed twice (as '{}' too)", a.name, b.name),
            ));
        }
        // Two servers under one name would hash to the same points.
        if let Some(label) = &a.label {
            if let Some(b) = all[..i].iter().find(|b| b.label.as_ref() == Some(label)) {
                return Err(ConfigError::new(
                    origins[i],
                    format!("'{}' and '{}' are both named '{label}'", b.name, a.name),
                ));
            }
        }
    }
    Ok(())
}
