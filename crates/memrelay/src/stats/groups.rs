//! The `stats` groups beyond the general one: `stats settings`,
//! `stats items`, `stats slabs`, `stats conns`, in memcached's format.
//!
//! - `settings`: memrelay's own settings, under memcached's key names where
//!   the meaning is the same (`maxconns`, `tcpport`, `item_size_max`...),
//!   then memrelay's own (`hash`, `timeout_ms`...). Built from the running
//!   configuration at start and at each reload.
//! - `items`, `slabs`: the servers' own replies, as the probers last read
//!   them (`super::servers`): first memcached's lines summed over the
//!   primaries (every key has one primary, so that is the cache as clients
//!   see it; ages and chunk sizes are the largest, not the sum), then each
//!   server's lines as `server:N:...`.
//! - `conns`: memrelay's listening sockets in memcached's
//!   `<n>:addr`/`<n>:state conn_listening` form, then each server's
//!   `curr_connections`. Client connections are not listed one by one:
//!   they live on the worker threads, out of reach of a reply; the general
//!   `stats` counts them (`curr_connections`).
//!
//! Any other group gets `CLIENT_ERROR`, never memcached's bare `ERROR`,
//! which clients read as "unknown command".

use std::fmt::Write as _;

use super::servers::{combined, Group, Stats};
use super::StatsRegistry;
use crate::config::{Config, Listen, Tier};

/// The settings `stats settings` shows, in order.
pub(crate) fn settings(cfg: &Config) -> Vec<(String, String)> {
    let ms = |d: std::time::Duration| d.as_millis().to_string();
    let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
    let tcp = cfg.listen.iter().find_map(|l| match l {
        Listen::Tcp(a) => Some(*a),
        Listen::Unix { .. } => None,
    });
    let unix = cfg.listen.iter().find_map(|l| match l {
        Listen::Unix { path, mode } => Some((path.display().to_string(), *mode)),
        Listen::Tcp(_) => None,
    });
    let mut s: Vec<(&str, String)> = vec![
        ("maxconns", cfg.max_conns.to_string()),
        ("tcpport", tcp.map_or(0, |a| a.port()).to_string()),
        ("udpport", "0".into()),
        ("inter", tcp.map_or("NULL".into(), |a| a.ip().to_string())),
        ("verbosity", cfg.verbosity.to_string()),
        // The servers evict; memrelay keeps nothing.
        ("evictions", "on".into()),
        (
            "domain_socket",
            unix.as_ref().map_or("NULL".into(), |u| u.0.clone()),
        ),
        (
            "umask",
            unix.as_ref().map_or("700".into(), |u| format!("{:o}", u.1)),
        ),
        ("num_threads", cfg.threads.to_string()),
        ("tcp_backlog", "1024".into()),
        ("binding_protocol", "ascii".into()),
        ("auth_enabled_ascii", yes_no(cfg.auth.is_some())),
        ("item_size_max", cfg.limits.max_value_len.to_string()),
        ("flush_enabled", yes_no(cfg.flush_enabled)),
        (
            "idle_timeout",
            cfg.idle_timeout.map_or(0, |d| d.as_secs()).to_string(),
        ),
        ("ssl_enabled", yes_no(cfg.tls.is_some())),
        // memrelay's own.
        ("proxy", "memrelay".into()),
        ("hash", cfg.hash.to_string()),
        ("primaries", cfg.primaries.len().to_string()),
        ("backups", cfg.backups.len().to_string()),
        ("backup_tiers", (cfg.tiers().count() - 1).to_string()),
        ("backend_conns", cfg.backend_conns.to_string()),
        ("connect_timeout_ms", ms(cfg.connect_timeout)),
        ("timeout_ms", ms(cfg.timeout)),
        ("failure_limit", cfg.failure_limit.to_string()),
        ("miss_fallback", yes_no(cfg.miss_fallback)),
        ("auto_eject", yes_no(cfg.auto_eject)),
        ("resync", yes_no(cfg.resync)),
        ("resync_rate", cfg.resync_rate.to_string()),
        ("max_keys", cfg.limits.max_keys.to_string()),
        ("max_pipeline", cfg.max_pipeline.to_string()),
        ("max_client_buffer", cfg.max_client_buffer.to_string()),
        ("max_reply_size", cfg.max_reply_size.to_string()),
        ("shutdown_timeout_ms", ms(cfg.shutdown_timeout)),
        ("server_tls", yes_no(cfg.server_tls.is_some())),
    ];
    s.retain(|(_, v)| !v.is_empty());
    s.into_iter().map(|(n, v)| (n.to_string(), v)).collect()
}

/// The reply to `stats <group>` (`group` is not empty, `reset` or
/// `servers`, which the general reply answers).
pub(crate) fn reply(r: &StatsRegistry, group: &[u8]) -> Vec<u8> {
    let mut out = String::with_capacity(4096);
    match group {
        b"settings" => {
            // memcached's first line: the memory the cache may use, here
            // the primaries' (each key lives on one).
            let maxbytes = r.primaries_sum("limit_maxbytes");
            let _ = write!(out, "STAT maxbytes {maxbytes}\r\n");
            for (name, value) in r.settings().iter() {
                let _ = write!(out, "STAT {name} {value}\r\n");
            }
        }
        b"items" => server_group(r, Group::Items, &mut out),
        b"slabs" => server_group(r, Group::Slabs, &mut out),
        b"conns" => {
            for (i, l) in r.settings_listen().iter().enumerate() {
                let _ = write!(
                    out,
                    "STAT {i}:addr {l}\r\nSTAT {i}:state conn_listening\r\n"
                );
            }
            for (i, s) in r.servers().iter().enumerate() {
                if let Some(n) = s.view.figures().number("curr_connections") {
                    let _ = write!(out, "STAT server:{i}:curr_connections {n}\r\n");
                }
            }
        }
        _ => {
            let name = String::from_utf8_lossy(&group[..group.len().min(64)]);
            let name: String = name.chars().filter(|c| !c.is_control()).collect();
            return format!(
                "CLIENT_ERROR stats {name} not supported by memrelay (try stats, stats settings, stats items, stats slabs, stats conns)\r\n"
            )
            .into_bytes();
        }
    }
    out.push_str("END\r\n");
    out.into_bytes()
}

/// `stats items` or `stats slabs`: the primaries' replies combined, then
/// every server's own, prefixed.
fn server_group(r: &StatsRegistry, g: Group, out: &mut String) {
    let servers = r.servers();
    let primaries: Vec<Stats> = servers
        .iter()
        .filter(|s| s.tier == Tier::Primary)
        .filter_map(|s| s.view.figures().get(g))
        .collect();
    for (name, v) in combined(&primaries) {
        let _ = write!(out, "STAT {name} {v}\r\n");
    }
    for (i, s) in servers.iter().enumerate() {
        for (name, v) in s.view.figures().get(g).iter().flat_map(|s| s.iter()) {
            let _ = write!(out, "STAT server:{i}:{name} {v}\r\n");
        }
    }
}
