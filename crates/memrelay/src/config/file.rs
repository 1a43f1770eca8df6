//! The configuration file (`--config PATH`): TOML, every setting the command
//! line has, grouped by concern. `examples/memrelay.toml` documents each key.
//!
//! Unknown keys are errors (a misspelt key silently ignored is a setting the
//! operator believes in and does not have), and every error names the file
//! and the key (`pools.primaries[1]`), or the line when the file is not TOML
//! at all. Values go through the command line's setters
//! ([`super::settings`]), so a key is checked exactly as its flag is.

use std::fmt;
use std::path::Path;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use toml::de::{DeTable, DeValue};

use super::settings::{Draft, Value, DEFAULT_HOST, DEFAULT_PORT, DEFAULT_UNIX_MODE};
use super::{listen_addr, port, unix_mode, ConfigError, Listen, Origin};

/// The file, as TOML gives it. Nothing here is required: what is left out
/// keeps its default (or the command line's value).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table of settings")]
struct File {
    #[serde(default)]
    listen: Vec<ListenKeys>,
    #[serde(default)]
    pools: Pools,
    #[serde(default)]
    timeouts: Timeouts,
    #[serde(default)]
    health: Health,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    ha: Ha,
    #[serde(default)]
    process: Process,
    #[serde(default)]
    metrics: Metrics,
    #[serde(default)]
    log: Log,
    #[serde(default)]
    tls: Tls,
    #[serde(default)]
    server_tls: ServerTls,
    #[serde(default)]
    fleet: FleetKeys,
}

/// `[fleet]`: the other memrelays behind the same VIP.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct FleetKeys {
    listen: Option<String>,
    peers: Option<Vec<String>>,
    secret_file: Option<String>,
    timeout: Option<DurationText>,
    confirm: Option<String>,
}

/// One `[[listen]]` table: `unix` (and `mode`), or `address` and `port`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct ListenKeys {
    address: Option<String>,
    port: Option<Count>,
    unix: Option<String>,
    mode: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct Pools {
    primaries: Option<Vec<String>>,
    /// The first backup tier.
    backups: Option<Vec<String>>,
    /// Further backup tiers, each a list.
    more_backup_tiers: Option<Vec<Vec<String>>>,
    hash: Option<String>,
    backend_conns: Option<Count>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct Timeouts {
    connect: Option<DurationText>,
    request: Option<DurationText>,
    idle: Option<DurationText>,
    write: Option<DurationText>,
    handshake: Option<DurationText>,
    shutdown: Option<DurationText>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct Health {
    failure_limit: Option<Count>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct Limits {
    max_conns: Option<Count>,
    max_pipeline: Option<Count>,
    max_client_buffer: Option<Count>,
    max_value_size: Option<Count>,
    max_keys: Option<Count>,
    max_reply_size: Option<Count>,
    max_memory: Option<Count>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct Ha {
    miss_fallback: Option<bool>,
    auto_eject: Option<bool>,
    resync: Option<bool>,
    resync_rate: Option<Count>,
    enable_flush_all: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct Process {
    threads: Option<Count>,
    user: Option<String>,
    group: Option<String>,
    daemon: Option<bool>,
    handoff: Option<String>,
    state_file: Option<String>,
    pidfile: Option<String>,
    auth_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct Metrics {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct Log {
    level: Option<String>,
    format: Option<String>,
    file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct Tls {
    cert: Option<String>,
    key: Option<String>,
    client_ca: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct ServerTls {
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    name: Option<String>,
}

/// A whole number (a count, a size, a port), as the command line takes it.
/// Its own type so that a wrong one is refused in words an operator reads
/// ("a whole number"), not Rust's ("u64"); its range is the flag's, checked
/// by the setter, which also refuses a negative one as the flag would.
#[derive(Debug)]
struct Count(String);

/// A duration as the command line takes it: `"250ms"`, `"2s"`, or a bare
/// number of milliseconds (a TOML integer or string).
#[derive(Debug)]
struct DurationText(String);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(AsText("a whole number")).map(Count)
    }
}

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(AsText("a duration like \"250ms\" or \"2s\""))
            .map(DurationText)
    }
}

impl fmt::Display for Count {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Takes a TOML string or integer as the text a flag would be given; says
/// what it expected (its field) when it is neither.
struct AsText(&'static str);

impl Visitor<'_> for AsText {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }
}

/// Reads `path` into `draft`.
pub(super) fn load(path: &Path, draft: &mut Draft) -> Result<(), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(
            &Origin::File(path.to_path_buf()),
            format!("cannot read: {e}"),
        )
    })?;
    let file: File = toml::from_str(&text).map_err(|e| toml_error(path, &text, &e))?;
    draft.read_from(path);
    apply(path, file, draft)
}

/// Feeds the file's values to the setters, each under its key's name.
fn apply(path: &Path, f: File, draft: &mut Draft) -> Result<(), ConfigError> {
    let mut put = Put { path, draft };
    for (i, l) in f.listen.into_iter().enumerate() {
        let listener = listener(path, &format!("listen[{i}]"), l)?;
        put.draft.add_listener(listener);
    }
    apply_pools(&mut put, f.pools)?;
    apply_timeouts(&mut put, f.timeouts, f.health)?;
    apply_limits(&mut put, f.limits)?;
    apply_ha(&mut put, f.ha)?;
    let p = f.process;
    put.text("process.threads", "-t", p.threads)?;
    put.text("process.user", "-u", p.user)?;
    put.text("process.group", "-g", p.group)?;
    put.switch("process.daemon", "-d", p.daemon)?;
    put.text("process.handoff", "--handoff", p.handoff)?;
    put.text("process.state_file", "--state-file", p.state_file)?;
    put.text("process.pidfile", "--pidfile", p.pidfile)?;
    put.text("process.auth_file", "--auth-file", p.auth_file)?;
    put.text("metrics.listen", "--metrics", f.metrics.listen)?;
    put.text("log.level", "--log-level", f.log.level)?;
    put.text("log.format", "--log-format", f.log.format)?;
    put.text("log.file", "--log-file", f.log.file)?;
    put.text("tls.cert", "--tls-cert", f.tls.cert)?;
    put.text("tls.key", "--tls-key", f.tls.key)?;
    put.text("tls.client_ca", "--tls-client-ca", f.tls.client_ca)?;
    let st = f.server_tls;
    put.text("server_tls.ca", "--server-tls-ca", st.ca)?;
    put.text("server_tls.cert", "--server-tls-cert", st.cert)?;
    put.text("server_tls.key", "--server-tls-key", st.key)?;
    put.text("server_tls.name", "--server-tls-name", st.name)?;
    let fl = f.fleet;
    put.text("fleet.listen", "--peer-listen", fl.listen)?;
    for (i, peer) in fl.peers.unwrap_or_default().iter().enumerate() {
        put.text(&format!("fleet.peers[{i}]"), "--peer", Some(peer))?;
    }
    put.text("fleet.secret_file", "--peer-secret-file", fl.secret_file)?;
    put.text("fleet.timeout", "--peer-timeout", fl.timeout.map(|d| d.0))?;
    put.text("fleet.confirm", "--peer-confirm", fl.confirm)?;
    Ok(())
}

/// `[pools]`: the servers of each tier, the hash, the connections.
fn apply_pools(put: &mut Put<'_>, pools: Pools) -> Result<(), ConfigError> {
    for (key, name, list) in [
        ("pools.primaries", "-s", pools.primaries),
        ("pools.backups", "-b", pools.backups),
    ] {
        for (i, s) in list.unwrap_or_default().iter().enumerate() {
            put.text(&format!("{key}[{i}]"), name, Some(s))?;
        }
    }
    for (i, tier) in pools
        .more_backup_tiers
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        put.text(
            &format!("pools.more_backup_tiers[{i}]"),
            "--backup-tier",
            Some(tier.join(",")),
        )?;
    }
    put.text("pools.hash", "--hash", pools.hash)?;
    put.text("pools.backend_conns", "-i", pools.backend_conns)?;
    Ok(())
}

/// `[timeouts]` and `[health]`.
fn apply_timeouts(put: &mut Put<'_>, t: Timeouts, health: Health) -> Result<(), ConfigError> {
    put.text(
        "timeouts.connect",
        "--connect-timeout",
        t.connect.map(|d| d.0),
    )?;
    put.text("timeouts.request", "--timeout", t.request.map(|d| d.0))?;
    put.text("timeouts.idle", "--idle-timeout", t.idle.map(|d| d.0))?;
    put.text("timeouts.write", "--write-timeout", t.write.map(|d| d.0))?;
    put.text(
        "timeouts.handshake",
        "--handshake-timeout",
        t.handshake.map(|d| d.0),
    )?;
    put.text(
        "timeouts.shutdown",
        "--shutdown-timeout",
        t.shutdown.map(|d| d.0),
    )?;
    put.text(
        "health.failure_limit",
        "--failure-limit",
        health.failure_limit,
    )?;
    Ok(())
}

/// `[limits]`.
fn apply_limits(put: &mut Put<'_>, l: Limits) -> Result<(), ConfigError> {
    put.text("limits.max_conns", "-n", l.max_conns)?;
    put.text("limits.max_pipeline", "--max-pipeline", l.max_pipeline)?;
    put.text(
        "limits.max_client_buffer",
        "--max-client-buffer",
        l.max_client_buffer,
    )?;
    put.text(
        "limits.max_value_size",
        "--max-value-size",
        l.max_value_size,
    )?;
    put.text("limits.max_keys", "--max-keys", l.max_keys)?;
    put.text(
        "limits.max_reply_size",
        "--max-reply-size",
        l.max_reply_size,
    )?;
    put.text("limits.max_memory", "--max-memory", l.max_memory)?;
    Ok(())
}

/// `[ha]`.
fn apply_ha(put: &mut Put<'_>, ha: Ha) -> Result<(), ConfigError> {
    // The flags are named for turning a default off: `--no-resync` is
    // `resync = false`.
    put.switch(
        "ha.miss_fallback",
        "--no-miss-fallback",
        ha.miss_fallback.map(|b| !b),
    )?;
    put.switch("ha.auto_eject", "--auto-eject", ha.auto_eject)?;
    put.switch("ha.resync", "--no-resync", ha.resync.map(|b| !b))?;
    put.text("ha.resync_rate", "--resync-rate", ha.resync_rate)?;
    put.switch(
        "ha.enable_flush_all",
        "--enable-flush-all",
        ha.enable_flush_all,
    )?;
    Ok(())
}

/// Hands values to the draft under their key's name.
struct Put<'a> {
    path: &'a Path,
    draft: &'a mut Draft,
}

impl Put<'_> {
    fn text(
        &mut self,
        key: &str,
        name: &'static str,
        v: Option<impl ToString>,
    ) -> Result<(), ConfigError> {
        match v {
            Some(v) => {
                let v = v.to_string();
                self.draft
                    .set(&Origin::key(self.path, key), name, Value::Text(&v))
            }
            None => Ok(()),
        }
    }

    fn switch(
        &mut self,
        key: &str,
        name: &'static str,
        on: Option<bool>,
    ) -> Result<(), ConfigError> {
        match on {
            Some(on) => self
                .draft
                .set(&Origin::key(self.path, key), name, Value::Switch(on)),
            None => Ok(()),
        }
    }
}

/// One `[[listen]]` table, resolved.
fn listener(path: &Path, key: &str, l: ListenKeys) -> Result<Listen, ConfigError> {
    let at = |field: &str| Origin::key(path, format!("{key}.{field}"));
    if let Some(unix) = l.unix {
        if l.address.is_some() || l.port.is_some() {
            return Err(ConfigError::new(
                &Origin::key(path, key),
                "a listener is either unix = PATH or address and port, not both",
            ));
        }
        let mode = match l.mode {
            Some(m) => unix_mode(&m).map_err(|e| ConfigError::new(&at("mode"), e))?,
            None => DEFAULT_UNIX_MODE,
        };
        return Ok(Listen::Unix {
            path: unix.into(),
            mode,
        });
    }
    if l.mode.is_some() {
        return Err(ConfigError::new(
            &at("mode"),
            "only a unix socket has a mode (unix = PATH)",
        ));
    }
    let p = match l.port {
        Some(p) => port(&p.0).map_err(|e| ConfigError::new(&at("port"), e))?,
        None => DEFAULT_PORT,
    };
    let host = l.address.as_deref().unwrap_or(DEFAULT_HOST);
    let addr = listen_addr(host, p).map_err(|e| ConfigError::new(&at("address"), e))?;
    Ok(Listen::Tcp(addr))
}

/// A TOML or schema error as one line naming the key it is about (found
/// from where in the text the error points), or the line when the text is
/// not TOML.
fn toml_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim().replace('\n', "; ");
    let origin = match e.span() {
        Some(span) => match key_at(text, span.start) {
            Some(key) => Origin::key(path, key),
            None => Origin::key(path, format!("line {}", line_of(text, span.start))),
        },
        None => Origin::File(path.to_path_buf()),
    };
    ConfigError::new(&origin, message)
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The dotted path of the key written at `offset` (or whose value is), like
/// `pools.primaries[1]`; `None` if the text does not parse as TOML.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let doc = DeTable::parse(text).ok()?;
    let mut path = String::new();
    find_in_table(doc.get_ref(), offset, &mut path).then_some(path)
}

/// Looks through every entry (a table's own span need not cover its keys:
/// `[pools]` is a header, its keys follow it).
fn find_in_table(t: &DeTable<'_>, offset: usize, path: &mut String) -> bool {
    for (k, v) in t {
        let len = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(k.get_ref());
        if k.span().contains(&offset) || find_in_value(v.get_ref(), offset, path) {
            return true;
        }
        if v.span().contains(&offset) && !matches!(v.get_ref(), DeValue::Table(_)) {
            return true;
        }
        path.truncate(len);
    }
    false
}

fn find_in_value(v: &DeValue<'_>, offset: usize, path: &mut String) -> bool {
    match v {
        DeValue::Table(t) => find_in_table(t, offset, path),
        DeValue::Array(items) => items.iter().enumerate().any(|(i, item)| {
            let len = path.len();
            path.push_str(&format!("[{i}]"));
            if find_in_value(item.get_ref(), offset, path)
                || (item.span().contains(&offset) && !matches!(item.get_ref(), DeValue::Table(_)))
            {
                return true;
            }
            path.truncate(len);
            false
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn load_str(text: &str) -> Result<crate::config::Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!(
            "memrelay-file-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memrelay.toml");
        std::fs::write(&path, text).unwrap();
        let mut d = Draft::default();
        let r = load(&path, &mut d).and_then(|()| d.finish());
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    fn key_of(text: &str) -> String {
        match load_str(text).unwrap_err().origin {
            Origin::Key { key, .. } => key,
            other => panic!("not a key: {other:?}"),
        }
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, &str)] = &[
            ("[pools]\nprimaries = ['127.0.0.1:1', '10.0.0.1']\n", "pools.primaries[1]"),
            ("[pools]\nprimaries = ['127.0.0.1:1']\nbogus = 1\n", "pools.bogus"),
            ("bogus = 1\n[pools]\nprimaries = ['127.0.0.1:1']\n", "bogus"),
            ("[pools]\nprimaries = ['127.0.0.1:1']\n[timeouts]\nrequest = 'soon'\n", "timeouts.request"),
            ("[pools]\nprimaries = ['127.0.0.1:1']\n[limits]\nmax_conns = -1\n", "limits.max_conns"),
            ("[pools]\nprimaries = ['127.0.0.1:1']\n[limits]\nmax_conns = 'many'\n", "limits.max_conns"),
            ("[pools]\nprimaries = ['127.0.0.1:1']\n[[listen]]\nport = 1\n[[listen]]\nport = 70000\n", "listen[1].port"),
            ("[pools]\nprimaries = ['127.0.0.1:1']\n[[listen]]\nunix = '/x'\nmode = '999'\n", "listen[0].mode"),
            ("[pools]\nprimaries = ['127.0.0.1:1']\n[[listen]]\nadress = 'x'\n", "listen[0].adress"),
            ("[pools]\nprimaries = ['127.0.0.1:1']\nbackups = ['127.0.0.1:1']\n", "pools.backups[0]"),
            ("[pools]\nbackups = ['127.0.0.1:2']\n", "pools.primaries"),
            ("[pools]\nprimaries = ['127.0.0.1:1']\n[ha]\nauto_eject = 'yes'\n", "ha.auto_eject"),
            ("[pools]\nprimaries = ['127.0.0.1:1']\nbackups = ['127.0.0.1:2']\n[ha]\nauto_eject = true\n", "ha.auto_eject"),
            ("[pools]\nprimaries = ['127.0.0.1:1']\n[log]\nformat = 'xml'\n", "log.format"),
            ("[pools]\nprimaries = ['127.0.0.1:1']\n[log]\nlevel = 'loud'\n", "log.level"),
            ("pools = 3\n", "pools"),
            ("[pools]\nprimaries = ['127.0.0.1:1'\n", "line 2"),
        ];
        for (text, key) in cases {
            assert_eq!(key_of(text), *key, "{text}");
        }
    }

    #[test]
    fn a_file_sets_what_the_flags_set() {
        let c = load_str(
            "[[listen]]\naddress = '127.0.0.1'\nport = 12000\n[[listen]]\nunix = '/tmp/m.sock'\nmode = '0770'\n\
             [pools]\nprimaries = ['127.0.0.1:11211', '127.0.0.1:11212']\nbackups = ['127.0.0.1:11213']\nhash = 'magent'\n\
             [timeouts]\nrequest = 250\nidle = '2s'\n[ha]\nresync = false\n[log]\nlevel = 'debug'\nformat = 'json'\n",
        )
        .unwrap();
        assert_eq!(
            c.listen,
            vec![
                Listen::Tcp("127.0.0.1:12000".parse().unwrap()),
                Listen::Unix {
                    path: "/tmp/m.sock".into(),
                    mode: 0o770
                }
            ]
        );
        assert_eq!(c.primaries.len(), 2);
        assert_eq!(c.backups.len(), 1);
        assert_eq!(c.hash, crate::config::HashKind::Magent);
        assert_eq!(c.timeout, std::time::Duration::from_millis(250));
        assert_eq!(c.idle_timeout, Some(std::time::Duration::from_secs(2)));
        assert!(!c.resync);
        assert_eq!(c.verbosity, 1);
        assert_eq!(c.log_format, crate::config::LogFormat::Json);
    }

    /// The example with its commented-out settings (`# key = value`,
    /// `# [[table]]`, and `# # comment` inside such a block) uncommented.
    fn uncommented(text: &str) -> String {
        let setting = |rest: &str| {
            rest.starts_with('[')
                || rest.starts_with("# ")
                || rest.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                })
        };
        text.lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if setting(rest) => rest,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Which keys of `[pools]`, `[timeouts]`, `[health]` and `[limits]` the example sets.
    fn servers_and_limits_shown(
        Pools {
            primaries,
            backups,
            more_backup_tiers,
            hash,
            backend_conns,
        }: Pools,
        Timeouts {
            connect,
            request,
            idle,
            write,
            handshake,
            shutdown,
        }: Timeouts,
        Health { failure_limit }: Health,
        Limits {
            max_conns,
            max_pipeline,
            max_client_buffer,
            max_value_size,
            max_keys,
            max_reply_size,
            max_memory,
        }: Limits,
    ) -> Vec<(&'static str, bool)> {
        vec![
            ("pools.primaries", primaries.is_some()),
            ("pools.backups", backups.is_some()),
            ("pools.more_backup_tiers", more_backup_tiers.is_some()),
            ("pools.hash", hash.is_some()),
            ("pools.backend_conns", backend_conns.is_some()),
            ("timeouts.connect", connect.is_some()),
            ("timeouts.request", request.is_some()),
            ("timeouts.idle", idle.is_some()),
            ("timeouts.write", write.is_some()),
            ("timeouts.handshake", handshake.is_some()),
            ("timeouts.shutdown", shutdown.is_some()),
            ("health.failure_limit", failure_limit.is_some()),
            ("limits.max_conns", max_conns.is_some()),
            ("limits.max_pipeline", max_pipeline.is_some()),
            ("limits.max_client_buffer", max_client_buffer.is_some()),
            ("limits.max_value_size", max_value_size.is_some()),
            ("limits.max_keys", max_keys.is_some()),
            ("limits.max_reply_size", max_reply_size.is_some()),
            ("limits.max_memory", max_memory.is_some()),
        ]
    }

    /// Which keys of `[ha]`, `[process]`, `[metrics]`, `[log]`, `[tls]` and `[server_tls]` the example sets.
    fn process_and_security_shown(
        Ha {
            miss_fallback,
            auto_eject,
            resync,
            resync_rate,
            enable_flush_all,
        }: Ha,
        Process {
            threads,
            user,
            group,
            daemon,
            handoff,
            state_file,
            pidfile,
            auth_file,
        }: Process,
        Metrics {
            listen: metrics_listen,
        }: Metrics,
        Log {
            level,
            format,
            file: log_file,
        }: Log,
        Tls {
            cert,
            key,
            client_ca,
        }: Tls,
        ServerTls {
            ca: server_ca,
            cert: server_cert,
            key: server_key,
            name: server_name,
        }: ServerTls,
    ) -> Vec<(&'static str, bool)> {
        vec![
            ("ha.miss_fallback", miss_fallback.is_some()),
            ("ha.auto_eject", auto_eject.is_some()),
            ("ha.resync", resync.is_some()),
            ("ha.resync_rate", resync_rate.is_some()),
            ("ha.enable_flush_all", enable_flush_all.is_some()),
            ("process.threads", threads.is_some()),
            ("process.user", user.is_some()),
            ("process.group", group.is_some()),
            ("process.daemon", daemon.is_some()),
            ("process.handoff", handoff.is_some()),
            ("process.state_file", state_file.is_some()),
            ("process.pidfile", pidfile.is_some()),
            ("process.auth_file", auth_file.is_some()),
            ("metrics.listen", metrics_listen.is_some()),
            ("log.level", level.is_some()),
            ("log.format", format.is_some()),
            ("log.file", log_file.is_some()),
            ("tls.cert", cert.is_some()),
            ("tls.key", key.is_some()),
            ("tls.client_ca", client_ca.is_some()),
            ("server_tls.ca", server_ca.is_some()),
            ("server_tls.cert", server_cert.is_some()),
            ("server_tls.key", server_key.is_some()),
            ("server_tls.name", server_name.is_some()),
        ]
    }

    /// examples/memrelay.toml documents every key: uncommented, it sets
    /// them all. The destructurings (here and in the two `*_shown`
    /// helpers) have no `..`, so a key added to the file format and not to
    /// the example fails to compile here.
    #[test]
    fn the_documented_example_shows_every_key() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/memrelay.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let all = uncommented(&text);
        let f: File = toml::from_str(&all).unwrap_or_else(|e| panic!("{}\n{all}", e));
        let File {
            listen,
            pools,
            timeouts,
            health,
            limits,
            ha,
            process,
            metrics,
            log,
            tls,
            server_tls,
            fleet:
                FleetKeys {
                    listen: fleet_listen,
                    peers,
                    secret_file,
                    timeout: peer_timeout,
                    confirm,
                },
        } = f;
        let mut shown = servers_and_limits_shown(pools, timeouts, health, limits);
        shown.extend(process_and_security_shown(
            ha, process, metrics, log, tls, server_tls,
        ));
        shown.extend([
            ("fleet.listen", fleet_listen.is_some()),
            ("fleet.peers", peers.is_some()),
            ("fleet.secret_file", secret_file.is_some()),
            ("fleet.timeout", peer_timeout.is_some()),
            ("fleet.confirm", confirm.is_some()),
        ]);
        for l in &listen {
            let ListenKeys {
                address,
                port,
                unix,
                mode,
            } = l;
            shown.push(("listen.address", address.is_some()));
            shown.push(("listen.port", port.is_some()));
            shown.push(("listen.unix", unix.is_some()));
            shown.push(("listen.mode", mode.is_some()));
        }
        for key in shown.iter().map(|(k, _)| *k) {
            assert!(
                shown.iter().any(|(k, is)| *k == key && *is),
                "{} does not show {key}",
                path.display()
            );
        }
        // And the uncommented whole is a valid configuration (with an auth
        // file that exists).
        let auth =
            std::env::temp_dir().join(format!("memrelay-example-auth-{}", std::process::id()));
        std::fs::write(&auth, "user:a-password-of-16-bytes\n").unwrap();
        std::fs::set_permissions(&auth, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let all = all.replace("/etc/memrelay/auth", &auth.to_string_lossy());
        // And a fleet secret that exists (the auth file is long enough).
        let all = all.replace("/etc/memrelay/fleet.secret", &auth.to_string_lossy());
        // And TLS files that exist: a self-signed certificate, which is
        // its own client CA here.
        let tls = std::env::temp_dir().join(format!("memrelay-example-tls-{}", std::process::id()));
        std::fs::create_dir_all(&tls).unwrap();
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = tls.join("cert.pem");
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(tls.join("key.pem"), made.key_pair.serialize_pem()).unwrap();
        let all = all
            .replace("/etc/memrelay/tls/cert.pem", &cert.to_string_lossy())
            .replace("/etc/memrelay/tls/client-ca.pem", &cert.to_string_lossy())
            .replace("/etc/memrelay/tls/servers-ca.pem", &cert.to_string_lossy())
            .replace(
                "/etc/memrelay/tls/memrelay-client.pem",
                &cert.to_string_lossy(),
            )
            .replace(
                "/etc/memrelay/tls/memrelay-client.key",
                &tls.join("key.pem").to_string_lossy(),
            )
            .replace("/etc/memrelay/tls", &tls.to_string_lossy());
        let loaded = load_str(&all);
        let _ = std::fs::remove_file(&auth);
        let _ = std::fs::remove_dir_all(&tls);
        assert!(loaded.is_ok(), "{loaded:?}");
    }
}
