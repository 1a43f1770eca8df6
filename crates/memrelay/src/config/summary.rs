//! The effective configuration in a few lines, for `--check-config`: what
//! an operator wants to see before a restart (where it listens, which
//! servers in which order, the timeouts), not every default.

use std::fmt::Write as _;
use std::time::Duration;

use super::Config;

impl Config {
    /// A short, human-readable account of the configuration.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        self.summary_servers(&mut out);
        self.summary_limits(&mut out);
        self.summary_security(&mut out);
        self.summary_process(&mut out);
        out
    }

    /// Where it listens, the servers of each tier, how keys are routed.
    fn summary_servers(&self, out: &mut String) {
        let source = match &self.config_file {
            Some(f) => format!("{} and the command line", f.display()),
            None => "the command line".into(),
        };
        let _ = writeln!(out, "configuration OK (from {source})");
        let listen: Vec<String> = self.listen.iter().map(|l| l.to_string()).collect();
        let _ = writeln!(out, "listen:     {}", listen.join(", "));
        let _ = writeln!(out, "primaries:  {}", names(&self.primaries));
        let _ = writeln!(out, "backups:    {}", names(&self.backups));
        for (i, tier) in self.more_tiers.iter().enumerate() {
            let _ = writeln!(out, "backups {}:  {}", i + 2, names(tier));
        }
        let _ = writeln!(
            out,
            "routing:    hash {}, worker threads {}, connections per server per thread {}",
            self.hash, self.threads, self.backend_conns
        );
    }

    /// Timeouts, health, limits and the HA policies.
    fn summary_limits(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "timeouts:   connect {}, request {}, idle {}, write {}, handshake {}, shutdown {}",
            ms(self.connect_timeout),
            ms(self.timeout),
            self.idle_timeout.map_or("never".into(), ms),
            ms(self.write_timeout),
            ms(self.handshake_timeout),
            ms(self.shutdown_timeout)
        );
        let _ = writeln!(
            out,
            "health:     down after {} consecutive failures",
            self.failure_limit
        );
        let _ = writeln!(
            out,
            "limits:     {} clients, pipeline {}, client buffer {} bytes, value {} bytes, reply {} bytes, {} keys per get, memory {} bytes",
            self.max_conns,
            self.max_pipeline,
            self.max_client_buffer,
            self.limits.max_value_len,
            self.max_reply_size,
            self.limits.max_keys,
            self.max_memory
        );
        let _ = writeln!(
            out,
            "ha:         miss fallback {}, auto eject {}, resync {} at {} items/s, flush_all {}",
            on(self.miss_fallback),
            on(self.auto_eject),
            on(self.resync),
            self.resync_rate,
            if self.flush_enabled {
                "allowed"
            } else {
                "refused"
            }
        );
    }

    /// TLS on both sides and client authentication.
    fn summary_security(&self, out: &mut String) {
        let tls = match &self.tls {
            None => "off".to_string(),
            Some(t) => format!(
                "on for TCP listeners, certificate {}, {}",
                t.cert.display(),
                t.client_ca
                    .as_ref()
                    .map_or("no client certificate".into(), |ca| format!(
                        "client certificate required (CA {})",
                        ca.display()
                    ))
            ),
        };
        let _ = writeln!(out, "tls:        {tls}");
        let server_tls = match &self.server_tls {
            None => "off".to_string(),
            Some(t) => format!(
                "on, CA {}, {}, {}",
                t.ca.display(),
                t.cert
                    .as_ref()
                    .map_or("no client certificate".into(), |(c, _)| format!(
                        "client certificate {}",
                        c.display()
                    )),
                t.name
                    .as_ref()
                    .map_or("each server's host checked".into(), |n| format!(
                        "name {} checked",
                        n.to_str()
                    ))
            ),
        };
        let _ = writeln!(out, "server tls: {server_tls}");
        let _ = writeln!(
            out,
            "auth:       {}",
            if self.auth.is_some() {
                "clients must authenticate (--auth-file)"
            } else {
                "off"
            }
        );
    }

    /// Monitoring, hand-off, state, logging and the process itself.
    fn summary_process(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "metrics:    {}",
            self.metrics.map_or("off".into(), |a| a.to_string())
        );
        let _ = writeln!(
            out,
            "handoff:    {}",
            self.handoff
                .as_ref()
                .map_or("off".into(), |p| p.display().to_string())
        );
        let _ = writeln!(
            out,
            "state file: {}",
            self.state_file
                .as_ref()
                .map_or("off".into(), |p| p.display().to_string())
        );
        let fleet = match &self.fleet {
            None => "off".to_string(),
            Some(f) => format!(
                "listens on {}, peers {}, timeout {:?}, confirm {}",
                f.listen,
                if f.peers.is_empty() {
                    "none".to_string()
                } else {
                    f.peers
                        .iter()
                        .map(|(given, _)| given.as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                },
                f.timeout,
                f.confirm
            ),
        };
        let _ = writeln!(out, "fleet:      {fleet}");
        let level = match self.verbosity {
            0 => "info",
            1 => "debug",
            _ => "trace",
        };
        let _ = writeln!(
            out,
            "log:        {level}, {}, to {}",
            self.log_format,
            self.log_file
                .as_ref()
                .map_or("stderr".into(), |p| p.display().to_string())
        );
        let _ = writeln!(
            out,
            "pidfile:    {}",
            self.pidfile
                .as_ref()
                .map_or("none".into(), |p| p.display().to_string())
        );
        let who = match (&self.user, &self.group) {
            (None, None) => "as started".to_string(),
            (u, g) => format!(
                "user {}, group {}",
                u.as_deref().unwrap_or("unchanged"),
                g.as_deref().unwrap_or("unchanged")
            ),
        };
        let _ = writeln!(
            out,
            "process:    {who}, {}",
            if self.daemonize {
                "detached"
            } else {
                "foreground"
            }
        );
    }
}

/// A tier's servers as the operator named them.
fn names(list: &[super::ServerAddr]) -> String {
    if list.is_empty() {
        return "none".into();
    }
    let names: Vec<String> = list
        .iter()
        .map(|s| {
            let mut n = s.name.clone();
            if s.weight != 1 {
                let _ = write!(n, " weight {}", s.weight);
            }
            if let Some(label) = &s.label {
                let _ = write!(n, " named {label}");
            }
            if s.name != s.addr.to_string() {
                let _ = write!(n, " ({})", s.addr);
            }
            n
        })
        .collect();
    names.join(", ")
}
/// A switch.
fn on(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}
// As the operator would write it: `10s`, `250ms`.
fn ms(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}
