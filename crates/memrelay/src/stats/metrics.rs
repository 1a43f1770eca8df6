//! The HTTP endpoint for monitoring (`--metrics 127.0.0.1:9150`):
//! - `/metrics`: Prometheus text format (counters, server state, HA and
//!   resync figures, the servers' own capacity figures as their probers
//!   last read them, request latency histograms per command);
//! - `/healthz`: 200 while the process runs;
//! - `/readyz`: 200 when every key can be served (each primary, or its
//!   backup, is up), 503 otherwise, with the reason.
//!
//! It runs on the main thread, away from the request path; a scrape reads
//! the workers' single-writer counters. This module renders the replies;
//! serving them over HTTP is `super::http`'s.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use super::{Histogram, ServerEntry, StatsRegistry, COMMAND_CLASSES, LATENCY_BOUNDS_US};

pub(crate) fn render(r: &StatsRegistry) -> String {
    let mut out = String::with_capacity(8192);
    process_metrics(&mut out, r);
    worker_counters(&mut out, r);
    if let Some(f) = r.fleet.get() {
        f.metrics(&mut out);
    }
    let servers = r.servers();
    server_metrics(&mut out, &servers);
    latency_metrics(&mut out, r, &servers);
    out
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(
        out,
        "# HELP memrelay_{name} {help}\n# TYPE memrelay_{name} {kind}"
    );
}

/// The process's own figures: version, uptime, allocations.
fn process_metrics(out: &mut String, r: &StatsRegistry) {
    metric(out, "info", "gauge", "memrelay's version.");
    let _ = writeln!(out, "memrelay_info{{version=\"{}\"}} 1", crate::VERSION);
    metric(out, "uptime_seconds", "gauge", "Seconds since start.");
    let _ = writeln!(
        out,
        "memrelay_uptime_seconds {}",
        r.started.elapsed().as_secs()
    );
    metric(
        out,
        "allocations_total",
        "counter",
        "Memory allocations since start.",
    );
    let _ = writeln!(
        out,
        "memrelay_allocations_total {}",
        crate::alloc::allocations()
    );
}

/// The workers' counters, summed, and the reload counters.
fn worker_counters(out: &mut String, r: &StatsRegistry) {
    let mut sums: Vec<(&'static str, u64)> = Vec::new();
    for w in &r.workers {
        for (i, (name, v)) in w.each().into_iter().enumerate() {
            match sums.get_mut(i) {
                Some(s) => s.1 += v,
                None => sums.push((name, v)),
            }
        }
    }
    for (name, v) in sums {
        if name == "curr_connections" {
            metric(out, "connections", "gauge", "Client connections open now.");
            let _ = writeln!(out, "memrelay_connections {v}");
        } else if name == "parked_connections" {
            metric(out, "connections_parked", "gauge", super::help(name));
            let _ = writeln!(out, "memrelay_connections_parked {v}");
        } else if name == "memory_held" {
            metric(
                out,
                "memory_held_bytes",
                "gauge",
                "Bytes clients hold in the proxy now (requests in flight, replies owed), against --max-memory.",
            );
            let _ = writeln!(out, "memrelay_memory_held_bytes {v}");
        } else {
            // `total_connections_total` would read as a stutter.
            let series = match name {
                "total_connections" => "connections_accepted_total".to_string(),
                _ => format!("{name}_total"),
            };
            metric(out, &series, "counter", super::help(name));
            let _ = writeln!(out, "memrelay_{series} {v}");
        }
    }
    for (name, help, v) in [
        (
            "reloads_total",
            "Configurations reloaded (SIGHUP, memrelay reload).",
            &r.reloads,
        ),
        (
            "reload_failures_total",
            "Reloads refused: the configuration was invalid, the running one kept.",
            &r.reload_failures,
        ),
    ] {
        metric(out, name, "counter", help);
        let _ = writeln!(out, "memrelay_{name} {}", v.load(Ordering::Relaxed));
    }
}

type Field = fn(bool, &super::ServerCounts) -> u64;

/// Per-server metrics: (name, type, help, the value from whether the server
/// is down and its counts).
const PER_SERVER: [(&str, &str, &str, Field); 12] = [
    (
        "server_up",
        "gauge",
        "1 if the server is up, 0 if marked down.",
        |down, _| u64::from(!down),
    ),
    (
        "server_failures_total",
        "counter",
        "Failed connections to the server.",
        |_, c| c.failures,
    ),
    (
        "server_marked_down_total",
        "counter",
        "Times the server was marked down.",
        |_, c| c.marked_down,
    ),
    (
        "server_missed_keys",
        "gauge",
        "Keys the server must not serve until invalidated on it.",
        |_, c| c.missed_keys,
    ),
    (
        "server_invalidated_total",
        "counter",
        "Missed keys deleted on the server after it came back.",
        |_, c| c.invalidated,
    ),
    (
        "server_flushed_total",
        "counter",
        "Flushes after the missed-key list overflowed.",
        |_, c| c.flushed,
    ),
    (
        "server_resync_running",
        "gauge",
        "1 while the server is being resynced.",
        |_, c| u64::from(c.resync.running),
    ),
    (
        "server_resync_copied_total",
        "counter",
        "Items copied to the server by its current or last resync.",
        |_, c| c.resync.copied,
    ),
    (
        "server_resync_scanned_total",
        "counter",
        "Keys listed on the source tier by the server's current or last resync.",
        |_, c| c.resync.scanned,
    ),
    (
        "server_resync_skipped_total",
        "counter",
        "Items the resync did not copy (a newer value was there, or it was gone).",
        |_, c| c.resync.skipped,
    ),
    (
        "server_resync_rate",
        "gauge",
        "Items per second of the server's current or last resync.",
        |_, c| c.resync.rate,
    ),
    (
        "server_resync_eta_seconds",
        "gauge",
        "Estimated seconds left in the server's resync.",
        |_, c| c.resync.eta,
    ),
];

/// Each server's state, HA and resync figures, and its own capacity.
fn server_metrics(out: &mut String, servers: &[ServerEntry]) {
    // One reading of each server for every per-server metric.
    let counts: Vec<_> = servers
        .iter()
        .map(|s| (s.view.is_down(), s.view.counts()))
        .collect();
    for (name, kind, help, f) in PER_SERVER {
        metric(out, name, kind, help);
        for (s, (down, c)) in servers.iter().zip(&counts) {
            let (addr, role) = (&s.name, s.tier);
            let _ = writeln!(
                out,
                "memrelay_{name}{{server=\"{addr}\",role=\"{role}\"}} {}",
                f(*down, c)
            );
        }
    }
    // The servers' own capacity figures, as their probers last read them
    // (none for a server out of reach).
    for (stat, name, kind, help) in CAPACITY_METRICS {
        metric(out, name, kind, help);
        for s in servers.iter() {
            let (addr, role) = (&s.name, s.tier);
            if let Some(v) = s.view.figures().number(stat) {
                let _ = writeln!(
                    out,
                    "memrelay_{name}{{server=\"{addr}\",role=\"{role}\"}} {v}"
                );
            }
        }
    }
}

/// The latency histograms, per command class and per server.
fn latency_metrics(out: &mut String, r: &StatsRegistry, servers: &[ServerEntry]) {
    metric(
        out,
        "request_duration_seconds",
        "histogram",
        "Time from a request's arrival to its reply, per command.",
    );
    for (c, class) in COMMAND_CLASSES.iter().enumerate() {
        let mut total = Histogram::default().snapshot();
        for w in &r.workers {
            total.add(&w.latency[c].snapshot());
        }
        histogram(
            out,
            "request_duration_seconds",
            &format!("command=\"{class}\""),
            &total,
        );
    }
    metric(
        out,
        "server_request_duration_seconds",
        "histogram",
        "Time from queueing a request to a server to its reply, per server.",
    );
    for s in servers.iter() {
        let (addr, role) = (&s.name, s.tier);
        let mut total = Histogram::default().snapshot();
        for w in s.view.latency() {
            total.add(&w.snapshot());
        }
        histogram(
            out,
            "server_request_duration_seconds",
            &format!("server=\"{addr}\",role=\"{role}\""),
            &total,
        );
    }
}

/// The servers' `stats` figures `/metrics` shows: (stat, metric, type, help).
const CAPACITY_METRICS: [(&str, &str, &str, &str); 7] = [
    (
        "curr_items",
        "server_items",
        "gauge",
        "Items stored on the server now (its curr_items).",
    ),
    (
        "bytes",
        "server_bytes",
        "gauge",
        "Bytes the server's items take now (its bytes).",
    ),
    (
        "limit_maxbytes",
        "server_limit_bytes",
        "gauge",
        "Memory the server may use for items (its limit_maxbytes, memcached -m).",
    ),
    (
        "total_items",
        "server_items_stored_total",
        "counter",
        "Items stored on the server since it started (its total_items).",
    ),
    (
        "evictions",
        "server_evictions_total",
        "counter",
        "Items the server evicted to make room, since it started (its evictions).",
    ),
    (
        "get_expired",
        "server_get_expired_total",
        "counter",
        "Reads that found an expired item on the server, since it started.",
    ),
    (
        "reclaimed",
        "server_reclaimed_total",
        "counter",
        "Expired items whose memory the server reused, since it started.",
    ),
];

/// One histogram's series (cumulative buckets, sum, count) under `labels`.
fn histogram(out: &mut String, name: &str, labels: &str, h: &super::HistogramSnapshot) {
    let mut cumulative = 0;
    for (i, bound) in LATENCY_BOUNDS_US.iter().enumerate() {
        cumulative += h.buckets[i];
        let _ = writeln!(
            out,
            "memrelay_{name}_bucket{{{labels},le=\"{}\"}} {cumulative}",
            *bound as f64 / 1e6
        );
    }
    cumulative += h.buckets[LATENCY_BOUNDS_US.len()];
    let _ = writeln!(
        out,
        "memrelay_{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}"
    );
    let _ = writeln!(
        out,
        "memrelay_{name}_sum{{{labels}}} {}",
        h.sum_us as f64 / 1e6
    );
    let _ = writeln!(out, "memrelay_{name}_count{{{labels}}} {cumulative}");
}
