//! High availability for the meta protocol: `ms`, `md`, `ma` keep the same
//! contract as the classic writes (to the primary, mirrored to the backup
//! before the client is answered; once on the backup when the primary is
//! down), `mg` falls back to the backup on a miss and repairs the primary,
//! quiet mode stays quiet under failover, and base64 keys are routed and
//! mirrored by their decoded key.
//!
//! Oracle: a lone "reference" memcached given the same prior state and the
//! same command says what the reply and the resulting item must be.
//! Waiting is always on a condition with a deadline.
#![allow(clippy::panic, clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::{
    escape, meta_done, parse_mg, same_item, wait_until, Client, Cluster, End, Item, Memcached,
    CONVERGE,
};

/// One primary, one backup and memrelay in front (the kit's `HA_FLAGS`:
/// 300 ms server timeouts, two workers), with `extra` memrelay flags.
fn cluster(extra: &[&str]) -> Cluster {
    Cluster::builder().flags(extra).start()
}

/// Waits until the proxy's `stats` says the primary is `down`, nudging it
/// with a request that goes there (a server is marked down by failures).
fn wait_primary_down(cl: &mut Cluster) {
    cl.wait_state(0, "down", |cl| {
        let _ = cl.client().send_until(b"mg nudge v\r\n", meta_done);
    });
}

// ---------------------------------------------------------------------------
// Meta replies and items
// ---------------------------------------------------------------------------

fn mn_done(b: &[u8]) -> bool {
    b.ends_with(b"MN\r\n")
}

fn direct(m: &Memcached) -> Client {
    let mut c = m.client();
    c.set_deadline(Duration::from_secs(3));
    c
}

/// The item on `m`; `key` may be `<base64> b`. `u` keeps a lease flag
/// from being handed out by the check itself.
fn peek(m: &Memcached, key: &str) -> Option<Item> {
    let r = direct(m).send_until(format!("mg {key} v f t u\r\n").as_bytes(), meta_done);
    assert_eq!(
        r.end,
        End::Complete,
        "mg {key} on {}: {}",
        m.addr(),
        escape(&r.bytes)
    );
    parse_mg(&r.bytes).unwrap_or_else(|e| panic!("mg {key} on {}: {e}", m.addr()))
}

/// Sends raw `req` straight to `m` and returns its reply up to `MN`.
fn direct_mn(m: &Memcached, req: &str) -> String {
    let r = direct(m).send_until(format!("{req}mn\r\n").as_bytes(), mn_done);
    assert_eq!(
        r.end,
        End::Complete,
        "{req:?} on {}: {}",
        m.addr(),
        escape(&r.bytes)
    );
    String::from_utf8_lossy(&r.bytes).into_owned()
}

/// Stores `value` with `flags` (no TTL) on `m`; `key` may be `<b64> b`.
fn poke(m: &Memcached, key: &str, flags: u32, value: &str) {
    let got = direct_mn(
        m,
        &format!("ms {key} {} F{flags}\r\n{value}\r\n", value.len()),
    );
    assert_eq!(got, "HD\r\nMN\r\n", "direct ms {key} on {}", m.addr());
}

/// The item's cas on `m` (0 when there is none).
/// The CAS token memrelay hands out for `key`'s item on `m` (the server's
/// unique under the stamp of its process: see memrelay's `ha::cas`).
fn token_of(m: &Memcached, key: &str) -> u64 {
    let s = support::stats(&m.addr());
    let num = |k: &str| -> i64 { s.get(k).and_then(|v| v.parse().ok()).unwrap_or(0) };
    let stamp = memrelay::ha::cas::stamp(&m.addr(), num("pid") as u64, num("time") - num("uptime"));
    memrelay::ha::cas::token(stamp, cas_of(m, key))
}

fn cas_of(m: &Memcached, key: &str) -> u64 {
    let got = direct_mn(m, &format!("mg {key} c\r\n"));
    got.split_whitespace()
        .find_map(|t| t.strip_prefix('c').and_then(|c| c.parse().ok()))
        .unwrap_or(0)
}

/// Standard base64 with padding.
fn b64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let word = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(word >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The meta writes under test
// ---------------------------------------------------------------------------

/// A write template: `{k}` the key, `{cas}` the item's current cas on the
/// replica that takes the write, `{wcas}` a wrong one.
fn render(tmpl: &str, key: &str, cas: u64) -> String {
    tmpl.replace("{k}", key)
        .replace("{wcas}", &(cas + 1000).to_string())
        .replace("{cas}", &cas.to_string())
}

/// (template, pre-state) for every meta write and each of its answers.
fn meta_writes() -> Vec<(&'static str, Option<&'static str>)> {
    vec![
        ("ms {k} 1 F5\r\nx\r\n", None),
        ("ms {k} 1 F5 T1000\r\nx\r\n", Some("a")),
        ("ms {k} 1 F5 k O9 s\r\nx\r\n", Some("a")),
        ("ms {k} 1 F5 ME\r\nx\r\n", None),
        ("ms {k} 1 F5 ME\r\nx\r\n", Some("a")),
        ("ms {k} 1 F5 MR\r\nx\r\n", None),
        ("ms {k} 1 F5 MR\r\nx\r\n", Some("a")),
        ("ms {k} 1 MA\r\nb\r\n", None),
        ("ms {k} 1 MA\r\nb\r\n", Some("a")),
        ("ms {k} 1 MP\r\nb\r\n", None),
        ("ms {k} 1 MP\r\nb\r\n", Some("a")),
        ("ms {k} 1 F5 MS\r\nx\r\n", Some("a")),
        ("ms {k} 1 F5 C{cas}\r\nx\r\n", Some("a")),
        ("ms {k} 1 F5 C{wcas}\r\nx\r\n", Some("a")),
        ("ms {k} 1 F5 C{wcas}\r\nx\r\n", None),
        ("ms {k} 1 MA C{cas}\r\nb\r\n", Some("a")),
        ("ms {k} 1 F5 ME C{cas}\r\nx\r\n", Some("a")),
        ("ms {k} 1 F5 MR C{cas}\r\nx\r\n", Some("a")),
        ("ms {k} 1 F5 I C{wcas}\r\nx\r\n", Some("a")),
        ("md {k}\r\n", None),
        ("md {k}\r\n", Some("a")),
        ("md {k} k O3\r\n", Some("a")),
        ("md {k} I\r\n", Some("a")),
        ("md {k} I T30\r\n", Some("a")),
        ("md {k} C{cas}\r\n", Some("a")),
        ("md {k} C{wcas}\r\n", Some("a")),
        ("ma {k}\r\n", None),
        ("ma {k}\r\n", Some("5")),
        ("ma {k} v\r\n", Some("5")),
        ("ma {k} N0 J7 v\r\n", None),
        ("ma {k} N0 J7 v\r\n", Some("5")),
        ("ma {k} N0 J7\r\n", None),
        ("ma {k} MD D2 v\r\n", Some("5")),
        ("ma {k} MD D9 v\r\n", Some("5")),
        ("ma {k} C{cas} v\r\n", Some("5")),
        ("ma {k} C{wcas} v\r\n", Some("5")),
        ("ma {k} v\r\n", Some("a")),
    ]
}

fn pre_name(pre: Option<&str>) -> String {
    pre.map(|p| format!("item {p:?}"))
        .unwrap_or("no item".into())
}

/// Sends `req` to the proxy and returns its one reply.
fn through(px: &mut Client, req: &str) -> String {
    let r = px.send_until(req.as_bytes(), meta_done);
    if r.end != End::Complete {
        return format!("<{:?}> {}", r.end, String::from_utf8_lossy(&r.bytes));
    }
    String::from_utf8_lossy(&r.bytes).into_owned()
}

/// The reply of a lone memcached `r` (which holds the prior state).
fn on_reference(r: &Memcached, req: &str) -> String {
    let got = direct_mn(r, req);
    got.strip_suffix("MN\r\n").unwrap_or(&got).to_string()
}

// ---------------------------------------------------------------------------
// (a) Everything up: the backup holds exactly the primary's item or nothing
// ---------------------------------------------------------------------------

#[test]
fn meta_writes_are_mirrored_to_the_backup() {
    let mut cl = cluster(&[]);
    let reference = Memcached::start();
    let mut px = cl.client();
    // (template, primary's pre-state, backup's pre-state)
    let mut cases: Vec<(&str, Option<&str>, Option<&str>)> =
        meta_writes().into_iter().map(|(t, p)| (t, p, p)).collect();
    // The backup holds what the primary does not, or another number.
    for t in [
        "ms {k} 1 F5 MR\r\nx\r\n",
        "ms {k} 1 MA\r\nb\r\n",
        "ms {k} 1 MP\r\nb\r\n",
        "ms {k} 1 F5 ME\r\nx\r\n",
        "ms {k} 1 F5\r\nx\r\n",
        "md {k}\r\n",
        "md {k} q\r\nmn\r\n",
        "ma {k}\r\n",
        "ma {k} N0 J7 v\r\n",
        "ma {k} N0 J7\r\n",
    ] {
        cases.push((t, None, Some("10")));
    }
    for t in [
        "ma {k} v\r\n",
        "ma {k}\r\n",
        "ma {k} MD v\r\n",
        "ma {k} q\r\nmn\r\n",
    ] {
        cases.push((t, Some("5"), Some("10")));
    }
    let mut failures = Vec::new();
    for (i, (tmpl, pre_p, pre_b)) in cases.iter().copied().enumerate() {
        let key = format!("mm-{i}");
        let name = format!(
            "{:?} on primary {} / backup {}",
            tmpl.lines().next().unwrap_or(""),
            pre_name(pre_p),
            pre_name(pre_b)
        );
        // The primary lost an item the backup holds: a write that needs the
        // item (replace, append, prepend, delete, ma without N) falls back to
        // the backup's, as a read would; the primary stays empty. A
        // create-if-absent (ME) is refused because of the backup's item,
        // and an autovivifying ma (N) uses it instead of creating one.
        let needs_item = [
            "ma {k} N0 J7",
            "ms {k} 1 F5 ME",
            "ms {k} 1 F5 MR",
            "ms {k} 1 MA",
            "ms {k} 1 MP",
            "md {k}",
            "ma {k}\r\n",
        ]
        .iter()
        .any(|p| tmpl.starts_with(p));
        let takes = pre_p.is_none() && pre_b.is_some() && needs_item;
        if let Some(v) = pre_p {
            poke(&cl.primaries[0], &key, 7, v);
        }
        if let Some(v) = if takes { pre_b } else { pre_p } {
            poke(&reference, &key, 7, v);
        }
        if let Some(v) = pre_b {
            poke(&cl.backups[0], &key, 7, v);
        }
        let req = render(tmpl, &key, token_of(&cl.primaries[0], &key));
        // A quiet template ends in `mn`, which both sides answer.
        let ref_req = render(tmpl, &key, cas_of(&reference, &key));
        let want_reply = on_reference(&reference, ref_req.trim_end_matches("mn\r\n"));
        let got_reply = if req.ends_with("mn\r\n") {
            let r = px.send_until(req.as_bytes(), mn_done);
            let got = String::from_utf8_lossy(&r.bytes).into_owned();
            got.strip_suffix("MN\r\n").unwrap_or(&got).to_string()
        } else {
            through(&mut px, &req)
        };
        if got_reply != want_reply {
            failures.push(format!(
                "{name}: memrelay answered {got_reply:?}, a lone memcached {want_reply:?}"
            ));
        }
        // The reply waited for the mirror: no waiting here.
        let want_p = if takes { None } else { peek(&reference, &key) };
        let got_p = peek(&cl.primaries[0], &key);
        if !same_item(&got_p, &want_p) {
            failures.push(format!(
                "{name}: primary holds {got_p:?}, expected {want_p:?}"
            ));
            continue;
        }
        let got_b = peek(&cl.backups[0], &key);
        if takes {
            let want_b = peek(&reference, &key);
            if !same_item(&got_b, &want_b) {
                failures.push(format!(
                    "{name}: backup holds {got_b:?}, expected {want_b:?} (it took the write)"
                ));
            }
        } else if !(same_item(&got_b, &got_p) || got_b.is_none()) {
            failures.push(format!(
                "{name}: backup holds {got_b:?}, primary {got_p:?} (expected the same or nothing)"
            ));
        }
        // And what the proxy serves is the primary's item.
        let served = parse_mg(through(&mut px, &format!("mg {key} v f\r\n")).as_bytes())
            .ok()
            .flatten()
            .map(|i| (i.value, i.flags));
        let want_served = if takes {
            got_b.map(|i| (i.value, i.flags))
        } else {
            got_p.map(|i| (i.value, i.flags))
        };
        if served != want_served {
            failures.push(format!(
                "{name}: mg through memrelay gave {served:?}, expected {want_served:?}"
            ));
        }
    }
    if !failures.is_empty() {
        let d = cl.diag();
        panic!(
            "{} of {} meta mirroring cases wrong:\n  {}\n{d}",
            failures.len(),
            cases.len(),
            failures.join("\n  ")
        );
    }
}

// ---------------------------------------------------------------------------
// (b) Primary down: applied once on the backup, the backup's reply
// ---------------------------------------------------------------------------

fn meta_writes_with_primary_killed(wait_marked_down: bool) {
    let extra: &[&str] = if wait_marked_down {
        &[]
    } else {
        &["--failure-limit", "1000"]
    };
    let mut cl = cluster(extra);
    let reference = Memcached::start();
    cl.primaries[0].kill();
    if wait_marked_down {
        wait_primary_down(&mut cl);
    }
    let mut px = cl.client();
    let mut failures = Vec::new();
    let cases = meta_writes();
    for (i, (tmpl, pre)) in cases.iter().copied().enumerate() {
        let key = format!("mk-{i}");
        let name = format!(
            "{:?} on {}",
            tmpl.lines().next().unwrap_or(""),
            pre_name(pre)
        );
        if let Some(v) = pre {
            poke(&cl.backups[0], &key, 7, v);
            poke(&reference, &key, 7, v);
        }
        let req = render(tmpl, &key, token_of(&cl.backups[0], &key));
        let want_reply = on_reference(&reference, &render(tmpl, &key, cas_of(&reference, &key)));
        let got_reply = through(&mut px, &req);
        if got_reply != want_reply {
            failures.push(format!(
                "{name}: memrelay answered {got_reply:?}, a lone memcached {want_reply:?}"
            ));
        }
        let (got, want) = (peek(&cl.backups[0], &key), peek(&reference, &key));
        if !same_item(&got, &want) {
            failures.push(format!("{name}: backup holds {got:?}, expected {want:?}"));
        }
    }
    if !failures.is_empty() {
        let d = cl.diag();
        panic!(
            "{} of {} meta writes wrong with the primary killed ({}):\n  {}\n{d}",
            failures.len(),
            cases.len(),
            if wait_marked_down {
                "marked down"
            } else {
                "not yet marked down"
            },
            failures.join("\n  ")
        );
    }
}

#[test]
fn meta_writes_go_to_the_backup_once_when_the_primary_is_marked_down() {
    meta_writes_with_primary_killed(true);
}

#[test]
fn meta_writes_go_to_the_backup_once_when_the_primary_just_died() {
    meta_writes_with_primary_killed(false);
}

// ---------------------------------------------------------------------------
// (c) mg falls back to the backup and repairs the primary
// ---------------------------------------------------------------------------

#[test]
fn mg_miss_falls_back_to_the_backup_and_repairs_the_primary() {
    let mut cl = cluster(&[]);
    let reference = Memcached::start();
    let mut px = cl.client();
    let mut failures = Vec::new();
    // (mg flags, key as sent, key as peeked, value, client flags, TTL)
    let bk = b64(b"fb key\x00\xff");
    let cases: Vec<(&str, String, String, u32, i64)> = vec![
        ("v f", "fb-0".into(), "fb-0".into(), 9, 0),
        ("v f t k O5 s", "fb-1".into(), "fb-1".into(), 11, 0),
        ("f", "fb-2".into(), "fb-2".into(), 3, 0),
        ("", "fb-3".into(), "fb-3".into(), 4, 0),
        ("v q", "fb-4".into(), "fb-4".into(), 5, 0),
        ("v f s", "fb-5".into(), "fb-5".into(), 6, 1000),
        ("b v f k", bk.clone(), format!("{bk} b"), 8, 0),
    ];
    for (flags, key, peek_key, cf, ttl) in &cases {
        let value = format!("val-{key}");
        let b = if peek_key.ends_with(" b") { " b" } else { "" };
        let set = format!("ms {key} {}{b} F{cf} T{ttl}\r\n{value}\r\n", value.len());
        assert_eq!(direct_mn(&cl.backups[0], &set), "HD\r\nMN\r\n");
        assert_eq!(direct_mn(&reference, &set), "HD\r\nMN\r\n");
        let req = format!("mg {key} {flags}\r\n")
            .replace("  ", " ")
            .replace(" \r\n", "\r\n");
        let want = on_reference(&reference, &req)
            .replace(" t1000", " t<ttl>")
            .replace(" t999", " t<ttl>");
        let got = through(&mut px, &req)
            .replace(" t1000", " t<ttl>")
            .replace(" t999", " t<ttl>");
        let name = format!("{req:?}");
        if got != want {
            failures.push(format!("{name}: memrelay answered {got:?}, a lone memcached with the backup's item {want:?}"));
        }
        let want_item = peek(&cl.backups[0], peek_key);
        let repaired = wait_until(CONVERGE, || {
            same_item(&peek(&cl.primaries[0], peek_key), &want_item)
        });
        if !repaired {
            failures.push(format!(
                "{name}: primary never repaired: holds {:?}, backup {want_item:?}",
                peek(&cl.primaries[0], peek_key)
            ));
        }
    }
    // A quiet miss on both stays quiet; mn closes the pipeline.
    let r = px.send_until(b"mg fb-none v q\r\nmg fb-none2 q k O1\r\nmn\r\n", mn_done);
    if r.bytes != b"MN\r\n" {
        failures.push(format!(
            "quiet misses on both replicas: {}",
            escape(&r.bytes)
        ));
    }
    // A repaired value never overwrites one written meanwhile (add mode):
    // value on the backup, a newer one written on the primary directly.
    poke(&cl.backups[0], "fb-race", 1, "old");
    let first = through(&mut px, "mg fb-race v f\r\n");
    if first != "VA 3 f1\r\nold\r\n" {
        failures.push(format!("mg fb-race: {first:?}"));
    }
    poke(&cl.primaries[0], "fb-race", 2, "new");
    // Whatever the repair left queued for the primary (its add, or a
    // delete undoing it) was queued before the mg above was answered, on
    // the one connection (-i 1) from this client's worker to the primary.
    // A read of the key through the same client follows it there: once it
    // is answered, memcached has executed all of that, so what the
    // primary holds now is final. (A late write showing up here is a
    // failure too: this read finds the key missing and falls back.)
    let barrier = through(&mut px, "mg fb-race v f\r\n");
    if barrier != "VA 3 f2\r\nnew\r\n" {
        failures.push(format!(
            "mg fb-race after a direct newer write: {barrier:?}"
        ));
    }
    let now = peek(&cl.primaries[0], "fb-race");
    if now.as_ref().map(|i| i.value.as_str()) != Some("new") {
        failures.push(format!(
            "fb-race: primary holds {now:?} after a direct newer write"
        ));
    }
    if !failures.is_empty() {
        let d = cl.diag();
        panic!(
            "{} mg fallback checks wrong:\n  {}\n{d}",
            failures.len(),
            failures.join("\n  ")
        );
    }
}

// ---------------------------------------------------------------------------
// (d) Quiet mode under failover, (e) base64 keys under failover
// ---------------------------------------------------------------------------

#[test]
fn quiet_meta_writes_to_a_dead_primary_stay_quiet_and_land_on_the_backup() {
    let mut cl = cluster(&[]);
    let reference = Memcached::start();
    cl.primaries[0].kill();
    let mut px = cl.client();
    let mut failures = Vec::new();
    for m in [&cl.backups[0], &reference] {
        poke(m, "q-exists", 7, "e");
        poke(m, "q-num", 7, "5");
        poke(m, "q-del", 7, "d");
    }
    let bk = b64(b"q b64 \x01");
    let pipeline = format!(
        "ms q-0 1 q\r\nx\r\nms q-1 2 q F3 T0\r\nyz\r\nms q-exists 1 q ME\r\nn\r\nms q-2 1 q MR\r\nr\r\n\
         md q-del q\r\nmd q-missing q\r\nma q-num q\r\nma q-num q v D2\r\nma q-missing q\r\n\
         ms {bk} 1 b q F2\r\nB\r\nmg q-0 q v\r\nmg q-missing q v\r\nmn\r\n"
    );
    let want = direct_mn(&reference, &pipeline.replace("mn\r\n", ""));
    let r = px.send_until(pipeline.as_bytes(), mn_done);
    let got = String::from_utf8_lossy(&r.bytes).into_owned();
    if got != want {
        failures.push(format!(
            "quiet pipeline: memrelay answered {got:?}, a lone memcached {want:?}"
        ));
    }
    for key in [
        "q-0",
        "q-1",
        "q-exists",
        "q-2",
        "q-del",
        "q-num",
        &format!("{bk} b"),
    ] {
        let (g, w) = (peek(&cl.backups[0], key), peek(&reference, key));
        if !same_item(&g, &w) {
            failures.push(format!("{key}: backup holds {g:?}, expected {w:?}"));
        }
    }
    // The plain case of the brief, alone: no reply, then MN, value on backup.
    let r = px.send_until(b"ms q-alone 1 q\r\n1\r\nmn\r\n", mn_done);
    if r.bytes != b"MN\r\n" {
        failures.push(format!("ms q-alone 1 q + mn: {}", escape(&r.bytes)));
    }
    let got = peek(&cl.backups[0], "q-alone");
    if got.as_ref().map(|i| i.value.as_str()) != Some("1") {
        failures.push(format!("q-alone on the backup: {got:?}"));
    }
    if !failures.is_empty() {
        let d = cl.diag();
        panic!(
            "{} quiet failover checks wrong:\n  {}\n{d}",
            failures.len(),
            failures.join("\n  ")
        );
    }
}

#[test]
fn base64_keys_are_mirrored_and_fail_over_by_their_decoded_key() {
    let mut cl = cluster(&[]);
    let mut px = cl.client();
    let mut failures = Vec::new();
    let keys: Vec<Vec<u8>> = vec![
        b"a b".to_vec(),
        b"\x00\x01\xff".to_vec(),
        b"x\r\ny".to_vec(),
        b"plain-b64".to_vec(),
    ];
    // All up: written through the proxy, mirrored under the same key.
    for (i, k) in keys.iter().enumerate() {
        let e = b64(k);
        let got = through(&mut px, &format!("ms {e} 2 b F{i} k\r\nv{i}\r\n"));
        if got != format!("HD k{e} b\r\n") {
            failures.push(format!("ms {e} b (all up): {got:?}"));
        }
        let pk = format!("{e} b");
        let (p, b) = (peek(&cl.primaries[0], &pk), peek(&cl.backups[0], &pk));
        let want = Some(Item {
            value: format!("v{i}"),
            flags: i as u32,
            ttl: -1,
        });
        if p != want || b != want {
            failures.push(format!(
                "{e} (all up): primary {p:?}, backup {b:?}, expected {want:?}"
            ));
        }
    }
    // The decoded key is the key: `get plain-b64` finds it.
    let r = px.send_until(b"get plain-b64\r\n", |b| b.ends_with(b"END\r\n"));
    if r.bytes != b"VALUE plain-b64 3 2\r\nv3\r\nEND\r\n" {
        failures.push(format!("get plain-b64: {}", escape(&r.bytes)));
    }
    // Primary dead: writes, deletes and reads go to the backup. (A set, not
    // an append: memcached 1.6.18 drops an item's binary-key mark when
    // `ms ... b MA` appends to it, and then echoes the raw key, CR LF
    // included, in `k`, a reply no client can frame. That is memcached's.)
    cl.primaries[0].kill();
    for (i, k) in keys.iter().enumerate() {
        let e = b64(k);
        let got = through(&mut px, &format!("ms {e} 2 b F{}\r\nn{i}\r\n", i + 10));
        if got != "HD\r\n" {
            failures.push(format!("ms {e} b (primary dead): {got:?}"));
        }
        let got = through(&mut px, &format!("mg {e} b v f k\r\n"));
        let want = format!("VA 2 f{} k{e} b\r\nn{i}\r\n", i + 10);
        if got != want {
            failures.push(format!(
                "mg {e} b (primary dead): {got:?}, expected {want:?}"
            ));
        }
    }
    let e0 = b64(&keys[0]);
    let got = through(&mut px, &format!("md {e0} b\r\n"));
    if got != "HD\r\n" {
        failures.push(format!("md {e0} b (primary dead): {got:?}"));
    }
    if let Some(it) = peek(&cl.backups[0], &format!("{e0} b")) {
        failures.push(format!("{e0} still on the backup after md: {it:?}"));
    }
    let ev = b64(b"viv \x02");
    let got = through(&mut px, &format!("ma {ev} b N0 J41 v\r\n"));
    if got != "VA 2\r\n41\r\n" {
        failures.push(format!("ma {ev} b N0 J41 v (primary dead): {got:?}"));
    }
    let got = peek(&cl.backups[0], &format!("{ev} b"));
    if got.as_ref().map(|i| i.value.as_str()) != Some("41") {
        failures.push(format!("{ev} on the backup after ma N0 J41: {got:?}"));
    }
    // Back empty: reads fall back to the backup and repair under the key.
    cl.primaries[0].restart();
    let e2 = b64(&keys[2]);
    let pk = format!("{e2} b");
    let want = peek(&cl.backups[0], &pk);
    let mut served = Vec::new();
    let repaired = wait_until(CONVERGE, || {
        served.push(through(&mut px, &format!("mg {e2} b v f\r\n")));
        same_item(&peek(&cl.primaries[0], &pk), &want)
    });
    if !repaired {
        failures.push(format!(
            "{e2} never repaired onto the primary: {:?}, backup {want:?}",
            peek(&cl.primaries[0], &pk)
        ));
    }
    let wrong: Vec<&String> = served
        .iter()
        .filter(|s| s.as_str() != "VA 2 f12\r\nn2\r\n")
        .collect();
    if !wrong.is_empty() {
        failures.push(format!("mg {e2} b after the restart served {wrong:?}"));
    }
    if !failures.is_empty() {
        let d = cl.diag();
        panic!(
            "{} base64 checks wrong:\n  {}\n{d}",
            failures.len(),
            failures.join("\n  ")
        );
    }
}

#[test]
fn meta_with_both_replicas_down_misses_and_fails_writes() {
    let mut cl = cluster(&[]);
    cl.primaries[0].kill();
    cl.backups[0].kill();
    let mut px = cl.client();
    let got = through(&mut px, "mg gone v k O7\r\n");
    assert_eq!(got, "EN kgone O7\r\n", "{}", cl.diag());
    for req in ["ms gone 1\r\nx\r\n", "md gone\r\n", "ma gone\r\n"] {
        let got = through(&mut px, req);
        assert!(
            got.starts_with("SERVER_ERROR "),
            "{req:?}: {got:?}\n{}",
            cl.diag()
        );
    }
    let r = px.send_until(b"mg gone v q\r\nmn\r\n", mn_done);
    assert_eq!(r.bytes, b"MN\r\n", "{}", escape(&r.bytes));
}
