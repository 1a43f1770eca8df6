//! The HA contract for request shapes beyond one request at a time: the same
//! key several times in one pipeline, TTL changes, create-if-absent commands
//! and copies made from a replica that missed writes. One primary and one
//! backup (real memcached processes) behind memrelay; where a reply is
//! checked, a lone reference memcached given the same requests says what it
//! must be.
#![allow(clippy::panic, clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::{escape, meta_done, parse_mg, Client, Cluster, End, Item, Memcached, CONVERGE};

/// One primary, one backup and memrelay in front (the kit's `HA_FLAGS`:
/// 300 ms server timeouts, two workers), with `extra` memrelay flags.
fn pair(extra: &[&str]) -> Cluster {
    Cluster::builder().flags(extra).start()
}

/// A client of the proxy whose `exchange` frames replies by a sentinel.
fn proxy_client(pair: &Cluster) -> Client {
    let mut c = Client::with_sentinel(&pair.relay.addr());
    c.set_deadline(Duration::from_secs(5));
    c
}

/// SIGSTOPs server `index` (0 the primary, 1 the backup) and waits
/// until memrelay marks it down, nudging it with requests through `px`
/// (a server is marked down by requests that fail).
fn stop_until_down(pair: &mut Cluster, index: usize, px: &mut Client) {
    let nudge = match index {
        0 => "get nudge\r\n",
        _ => "set nudge 0 0 1\r\nx\r\n",
    };
    pair.server(index).stop();
    pair.wait_state(index, "down", |_| {
        let _ = exchange(px, nudge);
    });
}

/// The item for `key` on `m`, read straight from it.
fn peek(m: &Memcached, key: &str) -> Option<Item> {
    let mut c = m.client();
    c.set_deadline(Duration::from_secs(3));
    let r = c.send_until(format!("mg {key} v f t\r\n").as_bytes(), meta_done);
    assert_eq!(r.end, End::Complete, "mg {key}: {}", escape(&r.bytes));
    parse_mg(&r.bytes).unwrap_or_else(|e| panic!("mg {key} on {}: {e}", m.addr()))
}

fn value_of(m: &Memcached, key: &str) -> Option<String> {
    peek(m, key).map(|i| i.value)
}

/// Sends raw requests straight to `m` and returns the replies (`mn`-framed).
fn direct(m: &Memcached, req: &str) -> String {
    let mut c = m.client();
    c.set_deadline(Duration::from_secs(3));
    let r = c.send_until(format!("{req}mn\r\n").as_bytes(), |b| {
        b.ends_with(b"MN\r\n")
    });
    assert_eq!(r.end, End::Complete, "{req}: {}", escape(&r.bytes));
    let s = String::from_utf8_lossy(&r.bytes).into_owned();
    s[..s.len() - 4].to_string()
}

fn exchange(c: &mut Client, req: &str) -> String {
    let r = c.exchange(req.as_bytes());
    assert_eq!(r.end, End::Complete, "{req}: {}", escape(&r.bytes));
    String::from_utf8_lossy(&r.bytes).into_owned()
}

/// Replaces the CAS unique of every `VALUE` line (the proxy forwards the
/// primary's, a reference memcached has its own counter).
fn mask_cas(s: &str) -> String {
    s.split("\r\n")
        .map(|l| {
            let t: Vec<&str> = l.split(' ').collect();
            if t.len() == 5 && t[0] == "VALUE" {
                format!("{} {} {} {} C", t[0], t[1], t[2], t[3])
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\r\n")
}

// ---------------------------------------------------------------------------
// The same key several times in one pipeline
// ---------------------------------------------------------------------------

/// A write whose backup copy waits for the primary's answer, followed in
/// the same write by a plain `set` of the key (whose copy goes at once):
/// the set must not overtake the first write's copy on the backup.
#[test]
fn pipelined_writes_to_one_key_leave_the_replicas_alike() {
    let pair = pair(&[]);
    let mut px = proxy_client(&pair);
    let firsts = [
        "append k 0 0 1\r\nx\r\n",
        "prepend k 0 0 1\r\nx\r\n",
        "add k 0 0 1\r\nx\r\n",
        "replace k 0 0 1\r\nx\r\n",
        "cas k 0 0 1 1\r\nx\r\n",
        "delete k\r\n",
        "incr k 1\r\n",
        "touch k 100\r\n",
        "ms k 1 MA\r\nx\r\n",
        "md k\r\n",
        "ma k\r\n",
    ];
    for (i, first) in firsts.iter().enumerate() {
        let key = format!("k{i}");
        let first = first.replace(" k", &format!(" {key}"));
        let initial = if first.starts_with("incr") || first.starts_with("ma") {
            "5"
        } else {
            "v1"
        };
        let r = exchange(
            &mut px,
            &format!("set {key} 0 0 {}\r\n{initial}\r\n", initial.len()),
        );
        assert_eq!(r, "STORED\r\n");
        let reply = exchange(&mut px, &format!("{first}set {key} 0 0 2\r\nv2\r\n"));
        assert!(reply.ends_with("STORED\r\n"), "{first}: {reply}");
        let (p, b) = (
            value_of(&pair.primaries[0], &key),
            value_of(&pair.backups[0], &key),
        );
        assert_eq!(p.as_deref(), Some("v2"), "primary after {first:?}");
        assert!(
            b.is_none() || b == p,
            "after {first:?} + set in one write, the backup holds {b:?}, the primary {p:?}"
        );
    }
}

/// With the primary lacking J and the backup holding it, `get J` followed
/// by `set J` in one write: the get sees the value before the set, as one
/// memcached would answer, and the set is not undone by the get's repair.
#[test]
fn a_pipelined_fallback_read_is_not_overtaken_by_a_later_set() {
    let pair = pair(&[]);
    let mut px = proxy_client(&pair);
    assert_eq!(
        direct(&pair.backups[0], "set j 0 0 2\r\nv1\r\n"),
        "STORED\r\n"
    );
    let r = exchange(&mut px, "get j\r\nset j 0 0 2\r\nv2\r\nget j\r\n");
    assert_eq!(
        r,
        "VALUE j 0 2\r\nv1\r\nEND\r\nSTORED\r\nVALUE j 0 2\r\nv2\r\nEND\r\n"
    );
    assert_eq!(value_of(&pair.primaries[0], "j").as_deref(), Some("v2"));
    assert_eq!(value_of(&pair.backups[0], "j").as_deref(), Some("v2"));
}

/// A pipeline of mixed commands over a few keys.
fn random_pipeline(rng: &mut fastrand::Rng, len: usize, keys: usize) -> String {
    let mut out = String::new();
    for _ in 0..len {
        let k = format!("p{}", rng.u64(..keys as u64));
        let v = format!("v{}", rng.u64(..100));
        let line = match rng.u64(..12) {
            0 | 1 => format!("set {k} 0 0 {}\r\n{v}\r\n", v.len()),
            2 => format!("get {k}\r\n"),
            3 => format!("append {k} 0 0 1\r\nx\r\n"),
            4 => format!("prepend {k} 0 0 1\r\ny\r\n"),
            5 => format!("delete {k}\r\n"),
            6 => format!("incr {k} 3\r\n"),
            7 => format!("gets {k}\r\n"),
            8 => format!("add {k} 0 0 {}\r\n{v}\r\n", v.len()),
            9 => format!("replace {k} 0 0 {}\r\n{v}\r\n", v.len()),
            10 => format!("set {k} 0 0 1\r\n{}\r\n", rng.u64(..10)),
            _ => {
                let k2 = format!("p{}", rng.u64(..keys as u64));
                format!("get {k} {k2}\r\n")
            }
        };
        out.push_str(&line);
    }
    out
}

/// Several seeds of a 60-command pipeline over 20 keys, sent in one write:
/// the proxy's replies are one memcached's, and the backup ends holding the
/// primary's item (or nothing) for every key.
#[test]
fn a_pipeline_over_few_keys_answers_as_one_memcached() {
    let pair = pair(&[]);
    for seed in 1..=8u64 {
        let reference = Memcached::start();
        // Seeded, so a failure names its pipeline.
        let mut rng = fastrand::Rng::with_seed(seed);
        let pipeline = random_pipeline(&mut rng, 60, 20);
        // Start from nothing on every side.
        assert_eq!(direct(&pair.primaries[0], "flush_all\r\n"), "OK\r\n");
        assert_eq!(direct(&pair.backups[0], "flush_all\r\n"), "OK\r\n");
        let mut px = proxy_client(&pair);
        let got = mask_cas(&exchange(&mut px, &pipeline));
        let want = mask_cas(&direct(&reference, &pipeline));
        assert_eq!(got, want, "seed {seed}, pipeline:\n{pipeline}");
        for k in 0..20 {
            let key = format!("p{k}");
            let (p, b) = (
                value_of(&pair.primaries[0], &key),
                value_of(&pair.backups[0], &key),
            );
            assert!(
                b.is_none() || b == p,
                "seed {seed}: backup holds {b:?} for {key}, primary {p:?}"
            );
            assert_eq!(p, value_of(&reference, &key), "seed {seed}: {key}");
        }
    }
}

// ---------------------------------------------------------------------------
// TTL changes reach every replica
// ---------------------------------------------------------------------------

fn ttl_of(m: &Memcached, key: &str) -> Option<i64> {
    peek(m, key).map(|i| i.ttl)
}

#[test]
fn gat_and_mg_t_change_the_ttl_on_every_replica() {
    let pair = pair(&[]);
    let mut px = proxy_client(&pair);
    // Shortened: the backup must not keep the old, longer TTL.
    assert_eq!(exchange(&mut px, "set a 0 100 2\r\nv1\r\n"), "STORED\r\n");
    assert_eq!(
        exchange(&mut px, "gat 2 a\r\n"),
        "VALUE a 0 2\r\nv1\r\nEND\r\n"
    );
    let (p, b) = (
        ttl_of(&pair.primaries[0], "a"),
        ttl_of(&pair.backups[0], "a"),
    );
    assert!(
        matches!(b, Some(t) if t <= 2),
        "backup TTL {b:?}, primary {p:?}"
    );
    // Lengthened: the backup must not expire early.
    assert_eq!(exchange(&mut px, "set b 0 2 2\r\nv1\r\n"), "STORED\r\n");
    let r = exchange(&mut px, "gats 100 b\r\n");
    assert!(r.starts_with("VALUE b 0 2 "), "{r}");
    let b = ttl_of(&pair.backups[0], "b");
    assert!(matches!(b, Some(t) if t > 90), "backup TTL {b:?}");
    // Expired at once: memcached misses right after, so must the proxy.
    assert_eq!(exchange(&mut px, "set c 0 100 2\r\nv1\r\n"), "STORED\r\n");
    assert_eq!(
        exchange(&mut px, "gat -1 c\r\nget c\r\n"),
        "VALUE c 0 2\r\nv1\r\nEND\r\nEND\r\n"
    );
    assert_eq!(value_of(&pair.backups[0], "c"), None);
    // The meta form.
    assert_eq!(exchange(&mut px, "set d 0 100 2\r\nv1\r\n"), "STORED\r\n");
    assert_eq!(exchange(&mut px, "mg d T1 v\r\n"), "VA 2\r\nv1\r\n");
    let b = ttl_of(&pair.backups[0], "d");
    assert!(
        matches!(b, Some(t) if t <= 1),
        "backup TTL after mg T1: {b:?}"
    );
    // A multi-key gat: every key found gets the TTL on the backup.
    assert_eq!(
        exchange(&mut px, "set e1 0 100 1\r\nx\r\nset e2 0 100 1\r\ny\r\n"),
        "STORED\r\nSTORED\r\n"
    );
    let r = exchange(&mut px, "gat 5 e1 nothere e2\r\n");
    assert_eq!(r, "VALUE e1 0 1\r\nx\r\nVALUE e2 0 1\r\ny\r\nEND\r\n");
    for k in ["e1", "e2"] {
        let b = ttl_of(&pair.backups[0], k);
        assert!(matches!(b, Some(t) if t <= 5), "{k}: backup TTL {b:?}");
    }
}

/// A `gat` served by the backup while the primary is down changed the TTL
/// there only: the primary's copy, with the old TTL, is invalidated before
/// it serves the key again.
#[test]
fn a_gat_that_went_past_a_down_primary_is_recorded_as_missed() {
    let mut pair = pair(&["--failure-limit", "1"]);
    let mut px = proxy_client(&pair);
    assert_eq!(exchange(&mut px, "set k 0 100 2\r\nv1\r\n"), "STORED\r\n");
    stop_until_down(&mut pair, 0, &mut px);
    assert_eq!(
        exchange(&mut px, "gat 1 k\r\n"),
        "VALUE k 0 2\r\nv1\r\n".to_string() + "END\r\n"
    );
    pair.primaries[0].cont();
    // The primary still holds k with the old TTL until it is invalidated.
    let gone = support::wait_until(CONVERGE, || value_of(&pair.primaries[0], "k").is_none());
    assert!(
        gone,
        "the primary kept k with its old TTL: {:?}",
        peek(&pair.primaries[0], "k")
    );
}

// ---------------------------------------------------------------------------
// Create-if-absent asks the replica that may hold what the primary lost
// ---------------------------------------------------------------------------

/// The seeds' users' lock: `add` after the primary restarted empty must
/// not steal a lock the backup still holds.
#[test]
fn add_after_the_primary_restarted_empty_does_not_steal_the_lock() {
    let mut pair = pair(&[]);
    let mut px = proxy_client(&pair);
    assert_eq!(
        exchange(&mut px, "set lock 0 0 6\r\nholder\r\n"),
        "STORED\r\n"
    );
    pair.primaries[0].restart();
    let mut px = proxy_client(&pair);
    let r = exchange(&mut px, "add lock 0 0 5\r\nthief\r\n");
    assert_eq!(r, "NOT_STORED\r\n");
    assert_eq!(
        value_of(&pair.backups[0], "lock").as_deref(),
        Some("holder")
    );
    assert_eq!(
        exchange(&mut px, "get lock\r\n"),
        "VALUE lock 0 6\r\nholder\r\nEND\r\n"
    );
    // The meta form, on a key the restarted primary lacks as well.
    assert_eq!(
        direct(&pair.backups[0], "set m 0 0 2\r\nv1\r\n"),
        "STORED\r\n"
    );
    assert_eq!(exchange(&mut px, "ms m 2 ME\r\nv3\r\n"), "NS\r\n");
    assert_eq!(value_of(&pair.backups[0], "m").as_deref(), Some("v1"));
    // A free key is created on both replicas.
    assert_eq!(exchange(&mut px, "add free 0 0 1\r\nx\r\n"), "STORED\r\n");
    assert_eq!(value_of(&pair.primaries[0], "free").as_deref(), Some("x"));
    assert_eq!(value_of(&pair.backups[0], "free").as_deref(), Some("x"));
    assert_eq!(
        exchange(&mut px, "ms free2 1 ME q\r\ny\r\nmn\r\n"),
        "MN\r\n"
    );
    assert_eq!(value_of(&pair.primaries[0], "free2").as_deref(), Some("y"));
    assert_eq!(value_of(&pair.backups[0], "free2").as_deref(), Some("y"));
}

/// The same without a restart: a write that went to the backup while the
/// primary was stopped, then invalidated on the primary when it resumed.
#[test]
fn add_after_an_invalidation_answers_from_the_backup() {
    let mut pair = pair(&["--failure-limit", "1"]);
    let mut px = proxy_client(&pair);
    assert_eq!(exchange(&mut px, "set k 0 0 2\r\nv1\r\n"), "STORED\r\n");
    stop_until_down(&mut pair, 0, &mut px);
    let addr = pair.relay.addr();
    assert_eq!(exchange(&mut px, "set k 0 0 2\r\nv2\r\n"), "STORED\r\n");
    pair.primaries[0].cont();
    let invalidated = support::wait_until(CONVERGE, || {
        support::stats(&addr)
            .get("server:0:state")
            .map(String::as_str)
            == Some("up")
            && value_of(&pair.primaries[0], "k").is_none()
    });
    assert!(invalidated, "k was never invalidated on the primary");
    assert_eq!(exchange(&mut px, "add k 0 0 2\r\nv3\r\n"), "NOT_STORED\r\n");
    assert_eq!(
        exchange(&mut px, "get k\r\n"),
        "VALUE k 0 2\r\nv2\r\nEND\r\n"
    );
}

/// The other way round: the primary holds an item the backup lacks (the
/// backup restarted). `add` answers as the primary does, and the item the
/// backup created meanwhile does not stand.
#[test]
fn add_on_a_key_only_the_primary_holds_is_refused_and_leaves_no_copy() {
    let pair = pair(&[]);
    let mut px = proxy_client(&pair);
    assert_eq!(
        direct(&pair.primaries[0], "set p 0 0 2\r\nv1\r\n"),
        "STORED\r\n"
    );
    assert_eq!(
        exchange(&mut px, "add p 0 0 5\r\nthief\r\n"),
        "NOT_STORED\r\n"
    );
    assert_eq!(value_of(&pair.primaries[0], "p").as_deref(), Some("v1"));
    let gone = support::wait_until(CONVERGE, || value_of(&pair.backups[0], "p").is_none());
    assert!(
        gone,
        "the backup kept {:?}",
        value_of(&pair.backups[0], "p")
    );
    assert_eq!(
        exchange(&mut px, "get p\r\n"),
        "VALUE p 0 2\r\nv1\r\nEND\r\n"
    );
}

// ---------------------------------------------------------------------------
// Copies come only from a replica that may serve the key
// ---------------------------------------------------------------------------

/// The backup missed the latest write of k (it was stopped), then the
/// primary, which held it, restarted empty: the resync of the primary must
/// not copy the backup's older value (or a value deleted since) back.
fn a_resync_never_copies_what_its_source_missed(second: &str) {
    let mut pair = pair(&["--failure-limit", "1"]);
    let mut px = proxy_client(&pair);
    assert_eq!(exchange(&mut px, "set k 0 0 2\r\nv1\r\n"), "STORED\r\n");
    stop_until_down(&mut pair, 1, &mut px);
    let addr = pair.relay.addr();
    let r = exchange(&mut px, second);
    assert!(r == "STORED\r\n" || r == "DELETED\r\n", "{second}: {r}");
    pair.primaries[0].restart();
    pair.backups[0].cont();
    // The resync runs (or gives up and retries); whatever it copied is
    // visible once it finished and both servers are up.
    let settled = support::wait_until(Duration::from_secs(20), || {
        let s = support::stats(&addr);
        s.get("server:0:resync_state").map(String::as_str) == Some("done")
            && s.get("server:1:state").map(String::as_str) == Some("up")
    });
    assert!(
        settled,
        "the resync never finished: {}",
        pair.relay.output()
    );
    let mut px = proxy_client(&pair);
    let r = exchange(&mut px, "get k\r\n");
    assert!(
        r == "END\r\n" || r == "VALUE k 0 2\r\nv2\r\nEND\r\n",
        "after {second:?} the proxy serves {r:?}"
    );
}

#[test]
fn a_resync_never_copies_a_value_its_source_missed_an_overwrite_of() {
    a_resync_never_copies_what_its_source_missed("set k 0 0 2\r\nv2\r\n");
}

#[test]
fn a_resync_never_copies_a_value_its_source_missed_the_delete_of() {
    a_resync_never_copies_what_its_source_missed("delete k\r\n");
}

// ---------------------------------------------------------------------------
// CAS uniques across a restart and a failover
// ---------------------------------------------------------------------------

/// One request on a connection without the sentinel (so the servers hold
/// no item the test did not write, and their CAS counters are predictable).
fn plain(addr: &str, req: &str) -> String {
    let mut c = Client::connect(addr);
    c.set_deadline(Duration::from_secs(5));
    let r = c.send_until(req.as_bytes(), |b| {
        b.ends_with(b"END\r\n") || (!b.starts_with(b"VALUE") && b.ends_with(b"\r\n"))
    });
    assert_eq!(r.end, End::Complete, "{req}: {}", escape(&r.bytes));
    String::from_utf8_lossy(&r.bytes).into_owned()
}

fn unique_of(gets_reply: &str) -> u64 {
    let line = gets_reply.lines().next().unwrap_or_default();
    line.split(' ')
        .nth(4)
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no unique in {gets_reply:?}"))
}

/// `gets` hands out a unique; the primary dies, a write goes to the backup,
/// the primary restarts empty and is repaired with that write, under its
/// fresh counter's first unique again. The old unique must not match it.
#[test]
fn a_cas_unique_from_before_a_restart_never_matches_a_newer_item() {
    let mut pair = pair(&[]);
    let addr = pair.relay.addr();
    assert_eq!(plain(&addr, "set k 0 0 2\r\nv1\r\n"), "STORED\r\n");
    let old = unique_of(&plain(&addr, "gets k\r\n"));
    pair.primaries[0].kill();
    assert_eq!(plain(&addr, "set k 0 0 2\r\nv2\r\n"), "STORED\r\n");
    pair.primaries[0].restart();
    // Wait until the proxy uses the restarted primary again, and k was
    // copied back to it (read repair or resync).
    let repaired = support::wait_until(Duration::from_secs(10), || {
        let _ = plain(&addr, "get k\r\n");
        value_of(&pair.primaries[0], "k").as_deref() == Some("v2")
    });
    assert!(repaired, "k never came back to the primary");
    let direct_unique = direct(&pair.primaries[0], "gets k\r\n");
    let r = plain(&addr, &format!("cas k 0 0 2 {old}\r\nv3\r\n"));
    assert_eq!(
        r, "EXISTS\r\n",
        "a unique from before the restart ({old}) matched; the primary's item: {direct_unique:?}"
    );
    assert_eq!(plain(&addr, "get k\r\n"), "VALUE k 0 2\r\nv2\r\nEND\r\n");
    // A unique the proxy hands out now works, and so does the meta form.
    let fresh = unique_of(&plain(&addr, "gets k\r\n"));
    assert_eq!(
        plain(&addr, &format!("cas k 0 0 2 {fresh}\r\nv4\r\n")),
        "STORED\r\n"
    );
    let mg = plain(&addr, "mg k c\r\n");
    let tok: u64 = mg
        .trim_end()
        .split(' ')
        .find_map(|t| t.strip_prefix('c').and_then(|n| n.parse().ok()))
        .unwrap_or_else(|| panic!("no c flag in {mg:?}"));
    assert_eq!(plain(&addr, &format!("ms k 2 C{old}\r\nv5\r\n")), "EX\r\n");
    assert_eq!(plain(&addr, &format!("ms k 2 C{tok}\r\nv5\r\n")), "HD\r\n");
    assert_eq!(plain(&addr, "get k\r\n"), "VALUE k 0 2\r\nv5\r\nEND\r\n");
}

/// A unique the backup handed out (the primary was down) does not match
/// the primary's item once the primary serves again.
#[test]
fn a_cas_unique_from_the_backup_never_matches_the_primarys_item() {
    let pair = pair(&[]);
    let addr = pair.relay.addr();
    // The backup holds k alone (the primary lost it): gets falls back.
    assert_eq!(
        direct(&pair.backups[0], "set k 0 0 2\r\nv1\r\n"),
        "STORED\r\n"
    );
    assert_eq!(
        direct(&pair.primaries[0], "set other 0 0 1\r\nx\r\n"),
        "STORED\r\n"
    );
    let from_backup = unique_of(&plain(&addr, "gets k\r\n"));
    // The repair gave the primary k, under its own counter (which here
    // gives the same number: only the token tells the two apart).
    assert_eq!(value_of(&pair.primaries[0], "k").as_deref(), Some("v1"));
    let r = plain(&addr, &format!("cas k 0 0 2 {from_backup}\r\nv2\r\n"));
    assert_eq!(
        r,
        "EXISTS\r\n",
        "backup's {from_backup}, primary's {:?}",
        direct(&pair.primaries[0], "gets k\r\n")
    );
}

/// Autovivifying meta commands (`ma ... N`, `mg ... N`) on a primary that
/// lost the item the backup holds: the acknowledged item is used, not a
/// fresh one; with no item anywhere, they create it as memcached does.
#[test]
fn autovivify_uses_the_backups_item_and_creates_only_when_none_exists() {
    let mut pair = pair(&[]);
    let mut px = proxy_client(&pair);
    assert_eq!(exchange(&mut px, "set cnt 0 0 2\r\n20\r\n"), "STORED\r\n");
    assert_eq!(exchange(&mut px, "set lease 0 0 2\r\nv1\r\n"), "STORED\r\n");
    pair.primaries[0].restart();
    let mut px = proxy_client(&pair);
    assert_eq!(exchange(&mut px, "ma cnt N0 J13 v\r\n"), "VA 2\r\n21\r\n");
    assert_eq!(value_of(&pair.backups[0], "cnt").as_deref(), Some("21"));
    assert_eq!(exchange(&mut px, "mg lease N30 v\r\n"), "VA 2\r\nv1\r\n");
    // Nothing anywhere: exactly what one memcached answers.
    let reference = Memcached::start();
    for req in [
        "ma fresh N0 J13 v\r\n",
        "ma fresh N0 J13 v\r\n",
        "mg newlease N30 v\r\n",
        "mg newlease N30 v\r\n",
    ] {
        let want = direct(&reference, req);
        assert_eq!(exchange(&mut px, req), want, "{req}");
    }
    assert_eq!(value_of(&pair.primaries[0], "fresh").as_deref(), Some("14"));
    assert_eq!(value_of(&pair.backups[0], "fresh").as_deref(), Some("14"));
}

/// The backup's copy expired a moment before the primary's (each memcached's
/// clock ticks on its own): a `gat` that finds the item on the primary and
/// gives it a new TTL puts it back on the backup too, or the item would
/// live on one replica only.
#[test]
fn a_gat_restores_a_backup_copy_that_expired_first() {
    let (_pair, _px, b) =
        ttl_change_on_the_primary_alone("gat 0 k\r\n", "VALUE k 5 2\r\nv1\r\nEND\r\n");
    assert!(
        matches!(&b, Some(i) if i.value == "v1" && i.flags == 5 && i.ttl == -1),
        "backup after the gat: {b:?}"
    );
}

/// Puts `k` (flags 5, TTL 100 s) on the primary alone, as if the backup's
/// copy had expired first, sends `req` (which makes `k` immortal) through
/// memrelay and checks that it answers `answer`; returns the backup's copy
/// of `k` then.
fn ttl_change_on_the_primary_alone(req: &str, answer: &str) -> (Cluster, Client, Option<Item>) {
    let pair = pair(&[]);
    let mut px = proxy_client(&pair);
    assert_eq!(
        direct(&pair.primaries[0], "set k 5 100 2\r\nv1\r\n"),
        "STORED\r\n"
    );
    assert_eq!(value_of(&pair.backups[0], "k"), None);
    assert_eq!(exchange(&mut px, req), answer, "{req}");
    let b = peek(&pair.backups[0], "k");
    (pair, px, b)
}

/// The same for a `touch`: the primary takes it, the backup's copy had
/// expired a moment before. The item the touch kept alive is read from the
/// primary and added to the backup with the touch's TTL, before the client
/// is answered: a failure of the primary right after would lose it.
#[test]
fn a_touch_restores_a_backup_copy_that_expired_first() {
    let (pair, mut px, b) = ttl_change_on_the_primary_alone("touch k 0\r\n", "TOUCHED\r\n");
    assert!(
        matches!(&b, Some(i) if i.value == "v1" && i.flags == 5 && i.ttl == -1),
        "backup after the touch: {b:?}"
    );
    // A key neither replica holds stays absent.
    assert_eq!(exchange(&mut px, "touch nothing 0\r\n"), "NOT_FOUND\r\n");
    assert_eq!(value_of(&pair.backups[0], "nothing"), None);
}

/// An `mg` that found the key on the backup repairs the primary before it
/// is answered, like a classic read: a `md` pipelined right after it must
/// not be overtaken by the repair (the key would come back).
#[test]
fn an_mg_repair_is_not_overtaken_by_a_pipelined_delete() {
    let pair = pair(&[]);
    let mut px = proxy_client(&pair);
    for i in 0..20 {
        let key = format!("r{i}");
        assert_eq!(
            direct(&pair.backups[0], &format!("set {key} 0 0 2\r\nv1\r\n")),
            "STORED\r\n"
        );
        let r = exchange(
            &mut px,
            &format!("mg {key} v\r\nmd {key}\r\nmg {key} v\r\n"),
        );
        assert_eq!(r, "VA 2\r\nv1\r\nHD\r\nEN\r\n", "{key}");
        assert_eq!(
            value_of(&pair.primaries[0], &key),
            None,
            "{key} came back on the primary"
        );
        assert_eq!(
            value_of(&pair.backups[0], &key),
            None,
            "{key} is still on the backup"
        );
    }
}

/// A backup whose `incr` reaches another number than the primary's (the
/// replicas diverged behind memrelay's back) disagrees with the primary:
/// it is counted (`mirror_mismatches`) and its copy deleted before the
/// client is answered, so it holds the primary's item or none.
#[test]
fn an_incr_whose_backup_reaches_another_number_is_a_counted_mismatch() {
    let mut pair = pair(&[]);
    assert_eq!(direct(pair.server(0), "set n 0 0 1\r\n5\r\n"), "STORED\r\n");
    assert_eq!(
        direct(pair.server(1), "set n 0 0 2\r\n10\r\n"),
        "STORED\r\n"
    );
    let addr = pair.relay.addr();
    assert_eq!(support::stat_u64(&addr, "mirror_mismatches"), 0);
    let mut px = proxy_client(&pair);
    assert_eq!(exchange(&mut px, "incr n 1\r\n"), "6\r\n");
    assert_eq!(value_of(pair.server(1), "n"), None, "the backup's copy");
    assert_eq!(value_of(pair.server(0), "n").as_deref(), Some("6"));
    assert_eq!(support::stat_u64(&addr, "mirror_mismatches"), 1);
    // Replicas that agree are no mismatch.
    assert_eq!(exchange(&mut px, "set m 0 0 1\r\n1\r\n"), "STORED\r\n");
    assert_eq!(exchange(&mut px, "incr m 1\r\n"), "2\r\n");
    assert_eq!(value_of(pair.server(1), "m").as_deref(), Some("2"));
    assert_eq!(support::stat_u64(&addr, "mirror_mismatches"), 1);
}
