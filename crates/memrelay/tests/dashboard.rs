//! The Grafana dashboard (packaging/grafana/memrelay-dashboard.json) asks
//! only for metrics memrelay serves: every `memrelay_*` name in its queries,
//! and every label they group by, is checked against a live `/metrics`
//! scrape of a memrelay with a primary and a backup. A metric renamed in
//! stats/metrics.rs without the dashboard fails here instead of leaving an
//! empty panel.
#![allow(clippy::panic, clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;
use std::path::Path;

use support::{free_port, http_get, Client, Memcached, Memrelay};

fn dashboard() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../packaging/grafana/memrelay-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()))
}

/// Every query in the document: panels' `expr`, and the template
/// variables' `query`/`definition` (the `$instance` list every panel
/// filters by).
fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// The identifiers in a PromQL expression that start with `prefix`.
fn words_after<'a>(expr: &'a str, prefix: &str) -> Vec<&'a str> {
    let mut found = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().next_back();
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            found.push(&tail[..end]);
        }
        rest = &tail[end..];
    }
    found
}

/// The label names in every `by (...)` of an expression.
fn grouping_labels(expr: &str) -> Vec<String> {
    let mut labels = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("by (") {
        let tail = &rest[i + 4..];
        let end = tail.find(')').unwrap_or(tail.len());
        labels.extend(tail[..end].split(',').map(|l| l.trim().to_string()));
        rest = &tail[end..];
    }
    labels
}

#[test]
fn every_metric_the_dashboard_queries_is_served() {
    let primary = Memcached::start();
    let backup = Memcached::start();
    let maddr = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let relay = Memrelay::start(&[
        "-t",
        "1",
        "--metrics",
        &maddr,
        "-s",
        &primary.addr(),
        "-b",
        &backup.addr(),
    ]);
    // Some traffic, so that every command class has a histogram line.
    let mut c = Client::connect(&relay.addr());
    let r = c.send_until(b"set d 0 0 1\r\nx\r\nget d\r\n", |b| {
        b.ends_with(b"END\r\n")
    });
    assert!(r.bytes.starts_with(b"STORED\r\n"), "{}", relay.output());

    let (status, body) = http_get(&maddr, "/metrics");
    assert_eq!(status, 200, "{body}");
    let mut served = BTreeSet::new();
    let mut labels = BTreeSet::from(["instance".to_string(), "job".to_string()]);
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        served.insert(line[..name_end].to_string());
        if let Some(set) = line[name_end..].strip_prefix('{') {
            for pair in set.split("\",") {
                if let Some((l, _)) = pair.split_once('=') {
                    labels.insert(l.trim().to_string());
                }
            }
        }
    }

    let mut all = Vec::new();
    exprs(&dashboard(), &mut all);
    assert!(
        all.len() >= 20,
        "only {} queries in the dashboard",
        all.len()
    );
    let mut queried = BTreeSet::new();
    for e in &all {
        for m in words_after(e, "memrelay_") {
            assert!(
                served.contains(m),
                "the dashboard queries {m}, which /metrics does not serve:\n  {e}\nserved: {served:?}"
            );
            queried.insert(m.to_string());
        }
        for l in grouping_labels(e) {
            assert!(
                labels.contains(&l),
                "the dashboard groups by {l:?}, a label no metric has:\n  {e}\nlabels: {labels:?}"
            );
        }
    }
    // What an operator opens the dashboard for is all there.
    for needed in [
        "memrelay_request_duration_seconds_bucket",
        "memrelay_request_duration_seconds_count",
        "memrelay_get_hits_total",
        "memrelay_get_misses_total",
        "memrelay_client_errors_total",
        "memrelay_server_errors_total",
        "memrelay_server_up",
        "memrelay_failovers_total",
        "memrelay_repairs_total",
        "memrelay_server_invalidated_total",
        "memrelay_connections",
        "memrelay_bytes_read_total",
        "memrelay_bytes_written_total",
        "memrelay_server_resync_copied_total",
        "memrelay_server_resync_scanned_total",
    ] {
        assert!(queried.contains(needed), "no panel shows {needed}");
    }
}

#[test]
fn the_query_scanner_finds_names_and_labels() {
    let e = r#"sum by (le, command) (rate(memrelay_request_duration_seconds_bucket{instance=~"$instance"}[5m])) / x_memrelay_no"#;
    assert_eq!(
        words_after(e, "memrelay_"),
        vec!["memrelay_request_duration_seconds_bucket"]
    );
    assert_eq!(grouping_labels(e), vec!["le", "command"]);
}
