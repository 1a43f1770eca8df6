//! Key distribution against reference tables recorded from the reference
//! implementations (scripts/hashref.py; ketama checked against a real
//! twemproxy, magent's hash against its C formula).
#![allow(clippy::panic)]

use memrelay::config::cli::{parse_args, Action};
use memrelay::router::{magent_hash, Router};

fn router_for(servers: &str, hash: &str) -> Router {
    let mut args = vec!["--hash".to_string(), hash.to_string()];
    for s in servers.split(',') {
        // Table hostnames like cache-a.example do not resolve here; the ring
        // only needs the names, so map each to a loopback address while
        // keeping the name the operator would type.
        args.push("-s".into());
        args.push(s.to_string());
    }
    match parse_args(args) {
        Ok(Action::Run(cfg)) => Router::new(&cfg),
        other => panic!("bad args for {servers}: {other:?}"),
    }
}

fn decode_key(field: &str) -> Vec<u8> {
    match field.strip_prefix("hex:") {
        Some(h) => (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).expect("hex key"))
            .collect(),
        None => field.as_bytes().to_vec(),
    }
}

#[test]
fn ketama_matches_twemproxy() {
    let table = include_str!("data/ketama.tsv");
    let mut checked = 0;
    let mut current: Option<(String, Router)> = None;
    for line in table
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let f: Vec<&str> = line.split('\t').collect();
        let (servers, key, index) = (
            f[0],
            decode_key(f[1]),
            f[2].parse::<usize>().expect("index"),
        );
        if servers.contains("example") {
            continue; // covered by ketama_with_hostnames below
        }
        if current.as_ref().map(|c| c.0 != servers).unwrap_or(true) {
            current = Some((servers.to_string(), router_for(servers, "ketama")));
        }
        let router = &current.as_ref().expect("router").1;
        assert_eq!(
            router.primary(&key),
            index,
            "key {:?} on {servers}",
            String::from_utf8_lossy(&key)
        );
        checked += 1;
    }
    assert!(checked >= 900, "only {checked} rows checked");
}

#[test]
fn ketama_with_hostnames() {
    // The names are hashed, not the addresses: build the continuum directly.
    let table = include_str!("data/ketama.tsv");
    let mut checked = 0;
    for line in table
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains("example"))
    {
        let f: Vec<&str> = line.split('\t').collect();
        let names: Vec<String> = f[0]
            .split(',')
            .map(|s| match s.strip_suffix(":11211") {
                Some(host) => host.to_string(),
                None => s.to_string(),
            })
            .collect();
        let c = memrelay::router::ketama::Continuum::new(&names);
        let key = decode_key(f[1]);
        let index: usize = f[2].parse().expect("index");
        assert_eq!(c.lookup(memrelay::router::ketama::key_hash(&key)), index);
        checked += 1;
    }
    assert!(checked >= 100, "only {checked} hostname rows");
}

#[test]
fn magent_hash_matches_magent() {
    let table = include_str!("data/magent_hash.tsv");
    let mut checked = 0;
    for line in table
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let f: Vec<&str> = line.split('\t').collect();
        let n: usize = f[0].parse().expect("n");
        let key = decode_key(f[1]);
        let index: usize = f[2].parse().expect("index");
        let hash: u32 = f[3].parse().expect("hash");
        assert_eq!(magent_hash(&key), hash, "key {:?}", key);
        let servers: Vec<String> = (0..n).map(|i| format!("127.0.0.1:{}", 20000 + i)).collect();
        let router = router_for(&servers.join(","), "magent");
        assert_eq!(router.primary(&key), index);
        checked += 1;
    }
    assert!(checked >= 500);
}
