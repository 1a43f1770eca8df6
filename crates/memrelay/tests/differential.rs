//! Differential suite: every case sends the same bytes to a lone memcached
//! (the reference) and to memrelay in front of two memcached shards (the
//! target), and requires byte-identical replies.
//!
//! The only tolerated differences are cas unique values (masked as `<cas>`
//! in `VALUE` lines, and substituted per side in requests via `$CAS(key)`)
//! and the text of `version` / `stats` replies (only their framing is
//! compared).
//!
//! `MEMRELAY_DIFF_TARGET=memcached` replaces memrelay by a second lone
//! memcached, to validate the harness itself (every case must pass then).
//! The default, and `MEMRELAY_DIFF_TARGET=memrelay`, test memrelay.
//!
//! Every case gets fresh servers, so keys never leak between cases.
#![allow(clippy::panic, clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::time::Duration;
use support::{complete_retrieval, escape, escape_max, Client, End, Memcached, Memrelay, Reply};

// ---------------------------------------------------------------------------
// Environments
// ---------------------------------------------------------------------------

enum Target {
    Memcached(Memcached),
    Relay {
        relay: Memrelay,
        shards: Vec<Memcached>,
    },
}

impl Target {
    fn start(extra: &[&str]) -> Target {
        match std::env::var("MEMRELAY_DIFF_TARGET").as_deref() {
            Ok("memcached") => Target::Memcached(Memcached::start()),
            Ok("memrelay") | Ok("") | Err(_) => {
                let shards = vec![Memcached::start(), Memcached::start()];
                // flush_all is part of what is compared: allow it.
                let mut args = vec!["--enable-flush-all".to_string()];
                for s in &shards {
                    args.push("-s".to_string());
                    args.push(s.addr());
                }
                args.extend(extra.iter().map(|a| a.to_string()));
                Target::Relay {
                    relay: Memrelay::start(&args),
                    shards,
                }
            }
            Ok(other) => panic!("MEMRELAY_DIFF_TARGET={other}: expected memcached or memrelay"),
        }
    }

    fn addr(&self) -> String {
        match self {
            Target::Memcached(m) => m.addr(),
            Target::Relay { relay, .. } => relay.addr(),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Target::Memcached(_) => "second memcached",
            Target::Relay { .. } => "memrelay",
        }
    }

    /// The memcached servers that hold the target's data.
    fn backends(&self) -> Vec<&Memcached> {
        match self {
            Target::Memcached(m) => vec![m],
            Target::Relay { shards, .. } => shards.iter().collect(),
        }
    }

    fn diagnostics(&mut self) -> String {
        match self {
            Target::Memcached(_) => String::new(),
            Target::Relay { relay, .. } => {
                let exited = match relay.exited() {
                    Some(st) => format!("memrelay EXITED: {st}\n"),
                    None => String::new(),
                };
                let out = relay.output();
                let tail: String = if out.len() > 4000 {
                    out[out.len() - 4000..].to_string()
                } else {
                    out
                };
                format!("{exited}memrelay output (tail):\n{tail}")
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Steps
// ---------------------------------------------------------------------------

/// One request on the case's connection, and how its reply is obtained.
#[derive(Clone)]
enum Step {
    /// Send, then read up to the sentinel reply.
    Ex(Vec<u8>),
    /// Like `Ex`, then store the sentinel again (after flush_all).
    Fresh(Vec<u8>),
    /// Send as separate writes, then read up to the sentinel reply.
    Split(Vec<Vec<u8>>),
    /// Send (no sentinel) and read until the server closes the connection.
    UntilClose(Vec<u8>),
    /// `version`: compare only the `VERSION <text>\r\n` framing.
    Version,
    /// `stats`: compare only the `STAT <name> <value>\r\n...END\r\n` framing.
    Stats,
    /// Open a new connection (with sentinel) for the following steps.
    Reconnect,
    /// Poll `get KEYS...` on new connections until all miss (deadline),
    /// e.g. after a delayed flush_all. Records the final reply. The sentinel
    /// is not used: an item stored in the second a delayed flush takes
    /// effect is flushed too, so this must be a case's last step.
    WaitGone(Vec<String>),
}

fn ex(b: impl AsRef<[u8]>) -> Step {
    Step::Ex(b.as_ref().to_vec())
}

fn fresh(b: impl AsRef<[u8]>) -> Step {
    Step::Fresh(b.as_ref().to_vec())
}

fn split<B: AsRef<[u8]>>(chunks: &[B]) -> Step {
    Step::Split(chunks.iter().map(|c| c.as_ref().to_vec()).collect())
}

/// Every byte of `b` in its own write.
fn bytewise(b: impl AsRef<[u8]>) -> Step {
    Step::Split(b.as_ref().iter().map(|&c| vec![c]).collect())
}

/// `b` in writes of `n` bytes.
fn chunked(b: impl AsRef<[u8]>, n: usize) -> Step {
    Step::Split(b.as_ref().chunks(n).map(|c| c.to_vec()).collect())
}

fn until_close(b: impl AsRef<[u8]>) -> Step {
    Step::UntilClose(b.as_ref().to_vec())
}

fn wait_gone(keys: &[String]) -> Step {
    Step::WaitGone(keys.to_vec())
}

/// `set KEY 0 0 LEN\r\nVAL\r\n` (or another storage command).
fn store(cmd: &str, key: &str, flags: u32, exptime: i64, val: &[u8]) -> Vec<u8> {
    let mut v = format!("{cmd} {key} {flags} {exptime} {}\r\n", val.len()).into_bytes();
    v.extend_from_slice(val);
    v.extend_from_slice(b"\r\n");
    v
}

fn set(key: &str, val: &str) -> Vec<u8> {
    store("set", key, 0, 0, val.as_bytes())
}

fn keys(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// `set` of every key (value = key), all in one buffer.
fn set_all(keys: &[String]) -> Vec<u8> {
    keys.iter()
        .flat_map(|k| set(k, &format!("v-{k}")))
        .collect()
}

fn get_line(cmd: &str, keys: &[String]) -> Vec<u8> {
    format!("{cmd} {}\r\n", keys.join(" ")).into_bytes()
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

// ---------------------------------------------------------------------------
// Running a case
// ---------------------------------------------------------------------------

/// What one step observed, after normalisation.
#[derive(Clone, PartialEq, Eq)]
struct Obs {
    bytes: Vec<u8>,
    end: End,
}

struct Side {
    addr: String,
    client: Client,
    /// Last cas unique seen per key in a `VALUE` line on this side.
    cas: HashMap<Vec<u8>, Vec<u8>>,
}

impl Side {
    fn new(addr: String) -> Side {
        let client = Client::with_sentinel(&addr);
        Side {
            addr,
            client,
            cas: HashMap::new(),
        }
    }

    /// Replaces `$CAS(key)` with the cas last seen for `key` on this side.
    fn substitute(&self, req: &[u8]) -> Vec<u8> {
        const OPEN: &[u8] = b"$CAS(";
        let mut out = Vec::with_capacity(req.len());
        let mut i = 0;
        while i < req.len() {
            if req[i..].starts_with(OPEN) {
                let start = i + OPEN.len();
                let close = req[start..]
                    .iter()
                    .position(|&c| c == b')')
                    .expect("unterminated $CAS(");
                let key = &req[start..start + close];
                let cas = self
                    .cas
                    .get(key)
                    .unwrap_or_else(|| panic!("case bug: no cas seen yet for {}", escape(key)));
                out.extend_from_slice(cas);
                i = start + close + 1;
            } else {
                out.push(req[i]);
                i += 1;
            }
        }
        out
    }

    /// Masks cas uniques in `VALUE` lines (recording them), walking data
    /// blocks by their length so that their content is never mistaken for
    /// a line.
    fn normalise(&mut self, reply: Reply) -> Obs {
        let b = &reply.bytes;
        let mut out = Vec::with_capacity(b.len());
        let mut pos = 0;
        while pos < b.len() {
            let Some(nl) = b[pos..].windows(2).position(|w| w == b"\r\n") else {
                out.extend_from_slice(&b[pos..]);
                break;
            };
            let line = &b[pos..pos + nl];
            pos += nl + 2;
            let toks: Vec<&[u8]> = line.split(|&c| c == b' ').collect();
            if let Some(len) = self.meta_line(&toks, &mut out) {
                // A `VA <len>` data block is copied by its length.
                match len {
                    Some(len) if pos + len + 2 <= b.len() => {
                        out.extend_from_slice(&b[pos..pos + len + 2]);
                        pos += len + 2;
                    }
                    Some(_) => {
                        out.extend_from_slice(&b[pos..]);
                        break;
                    }
                    None => {}
                }
            } else if toks.first() == Some(&&b"VALUE"[..]) && (toks.len() == 4 || toks.len() == 5) {
                if toks.len() == 5 && !toks[4].is_empty() && toks[4].iter().all(u8::is_ascii_digit)
                {
                    self.cas.insert(toks[1].to_vec(), toks[4].to_vec());
                    out.extend_from_slice(&toks[..4].join(&b' '));
                    out.extend_from_slice(b" <cas>\r\n");
                } else {
                    out.extend_from_slice(line);
                    out.extend_from_slice(b"\r\n");
                }
                let len = std::str::from_utf8(toks[3])
                    .ok()
                    .and_then(|t| t.parse::<usize>().ok());
                match len {
                    Some(len) if pos + len + 2 <= b.len() => {
                        out.extend_from_slice(&b[pos..pos + len + 2]);
                        pos += len + 2;
                    }
                    _ => {
                        out.extend_from_slice(&b[pos..]);
                        break;
                    }
                }
            } else {
                out.extend_from_slice(line);
                out.extend_from_slice(b"\r\n");
            }
        }
        Obs {
            bytes: out,
            end: reply.end,
        }
    }

    /// A meta reply line (`VA HD EN NF NS EX`): masks its cas token
    /// (`c<digits>`, the `c` flag's answer) as `c<cas>`, recording it for
    /// `$CAS(key)` when the line also returns the key (`k<key>`). Returns
    /// None when `toks` is not a meta reply line (nothing written), else
    /// Some(data block length) for `VA` and Some(None) otherwise.
    fn meta_line(&mut self, toks: &[&[u8]], out: &mut Vec<u8>) -> Option<Option<usize>> {
        let status = *toks.first()?;
        if !matches!(status, b"VA" | b"HD" | b"EN" | b"NF" | b"NS" | b"EX") {
            return None;
        }
        let (len, first_flag) = if status == b"VA" {
            let len = std::str::from_utf8(toks.get(1)?)
                .ok()
                .and_then(|t| t.parse::<usize>().ok())?;
            (Some(len), 2)
        } else {
            (None, 1)
        };
        let is_cas =
            |t: &[u8]| t.len() > 1 && t[0] == b'c' && t[1..].iter().all(u8::is_ascii_digit);
        let key = toks[first_flag..]
            .iter()
            .find(|t| t.first() == Some(&b'k'))
            .map(|t| t[1..].to_vec());
        let mut masked: Vec<&[u8]> = Vec::with_capacity(toks.len());
        for (i, t) in toks.iter().enumerate() {
            if i >= first_flag && is_cas(t) {
                if let Some(k) = &key {
                    self.cas.insert(k.clone(), t[1..].to_vec());
                }
                masked.push(b"c<cas>");
            } else {
                masked.push(t);
            }
        }
        out.extend_from_slice(&masked.join(&b' '));
        out.extend_from_slice(b"\r\n");
        Some(len)
    }

    fn run(&mut self, step: &Step) -> Obs {
        match step {
            Step::Ex(req) => {
                let req = self.substitute(req);
                let r = self.client.exchange(&req);
                self.normalise(r)
            }
            Step::Fresh(req) => {
                let req = self.substitute(req);
                let r = self.client.exchange_resentinel(&req);
                self.normalise(r)
            }
            Step::Split(chunks) => {
                let chunks: Vec<Vec<u8>> = chunks.iter().map(|c| self.substitute(c)).collect();
                let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
                let r = self.client.exchange_split(&refs);
                self.normalise(r)
            }
            Step::UntilClose(req) => {
                let r = self.client.send_until_close(req);
                self.normalise(r)
            }
            Step::Version => {
                let r = self.client.exchange(b"version\r\n");
                let ok = r.end == End::Complete
                    && r.bytes.starts_with(b"VERSION ")
                    && r.bytes.len() > b"VERSION \r\n".len()
                    && r.bytes.ends_with(b"\r\n")
                    && !r.bytes[..r.bytes.len() - 2].contains(&b'\n')
                    && !r.bytes[..r.bytes.len() - 2].contains(&b'\r');
                if ok {
                    Obs {
                        bytes: b"VERSION <text>\r\n".to_vec(),
                        end: r.end,
                    }
                } else {
                    Obs {
                        bytes: r.bytes,
                        end: r.end,
                    }
                }
            }
            Step::Stats => {
                let r = self.client.exchange(b"stats\r\n");
                if r.end == End::Complete && stats_framing_ok(&r.bytes) {
                    Obs {
                        bytes: b"STAT <n lines>\r\nEND\r\n".to_vec(),
                        end: r.end,
                    }
                } else {
                    Obs {
                        bytes: r.bytes,
                        end: r.end,
                    }
                }
            }
            Step::Reconnect => {
                self.client = Client::with_sentinel(&self.addr);
                Obs {
                    bytes: b"<reconnected>".to_vec(),
                    end: End::Complete,
                }
            }
            Step::WaitGone(keys) => {
                let req = get_line("get", keys);
                let mut last = None;
                let gone = support::wait_until(Duration::from_secs(10), || {
                    let mut c = Client::connect(&self.addr);
                    let r = c.send_until(&req, complete_retrieval);
                    let done = r.bytes == b"END\r\n";
                    last = Some(r);
                    done
                });
                let r = last.expect("polled at least once");
                if gone {
                    self.normalise(r)
                } else {
                    let mut o = self.normalise(r);
                    o.bytes
                        .splice(0..0, b"<still present after 10 s> ".iter().copied());
                    o
                }
            }
        }
    }
}

fn stats_framing_ok(b: &[u8]) -> bool {
    let Some(body) = b.strip_suffix(b"END\r\n") else {
        return false;
    };
    let Some(body) = body.strip_suffix(b"\r\n") else {
        return false;
    };
    body.split(|&c| c == b'\n').all(|l| {
        let l = l.strip_suffix(b"\r").unwrap_or(l);
        let toks: Vec<&[u8]> = l.split(|&c| c == b' ').collect();
        toks.len() >= 3 && toks[0] == b"STAT" && !toks[1].is_empty() && !l.contains(&b'\r')
    })
}

/// What the reference must show for a step, so that a broken harness (a
/// reply that never ends, a sentinel that went missing) can not pass.
fn expected_end(step: &Step) -> End {
    match step {
        Step::UntilClose(_) => End::Closed,
        _ => End::Complete,
    }
}

fn describe(step: &Step) -> String {
    match step {
        Step::Ex(b) | Step::Fresh(b) | Step::UntilClose(b) => escape_max(b, 600),
        Step::Split(c) => {
            format!("[{} writes] {}", c.len(), escape_max(&c.concat(), 600))
        }
        Step::Version => "version".into(),
        Step::Stats => "stats".into(),
        Step::Reconnect => "<reconnect>".into(),
        Step::WaitGone(k) => {
            format!(
                "<poll get {} until all miss>",
                escape_max(k.join(" ").as_bytes(), 600)
            )
        }
    }
}

fn run_case(name: &str, steps: Vec<Step>) {
    run_case_with(name, steps, &[])
}

/// `run_case` with extra memrelay arguments.
fn run_case_with(name: &str, steps: Vec<Step>, relay_args: &[&str]) {
    if let Some(i) = steps.iter().position(|s| matches!(s, Step::WaitGone(_))) {
        assert_eq!(
            i + 1,
            steps.len(),
            "case bug in {name}: WaitGone must be the last step"
        );
    }
    let reference = Memcached::start();
    let mut target = Target::start(relay_args);

    let mut want_side = Side::new(reference.addr());
    let want: Vec<Obs> = steps.iter().map(|s| want_side.run(s)).collect();
    for (i, (s, w)) in steps.iter().zip(&want).enumerate() {
        assert_eq!(
            w.end,
            expected_end(s),
            "harness: case {name} step {i} on the reference memcached ended with {:?}, \
             expected {:?}\nrequest:\n{}\nreply:\n{}",
            w.end,
            expected_end(s),
            describe(s),
            escape(&w.bytes)
        );
    }

    if std::env::var_os("MEMRELAY_DIFF_VERBOSE").is_some() {
        let mut t = format!("=== case {name}: reference transcript\n");
        for (s, w) in steps.iter().zip(&want) {
            t.push_str(&format!(
                ">>> {}\n<<< ({:?}) {}\n",
                describe(s),
                w.end,
                escape(&w.bytes)
            ));
        }
        eprintln!("{t}");
    }

    let mut got_side = Side::new(target.addr());
    let mut got: Vec<Obs> = Vec::new();
    for s in &steps {
        // The reference never times out (checked above). After a timeout
        // on the target the connection's state is unknown and every further
        // step would wait out its deadline too: the case has failed
        // already, so the rest is not run.
        if got.last().is_some_and(|g: &Obs| g.end == End::Timeout) {
            got.push(Obs {
                bytes: b"<not run: an earlier step timed out>".to_vec(),
                end: End::Timeout,
            });
        } else {
            got.push(got_side.run(s));
        }
    }

    let mut report = String::new();
    for (i, ((s, w), g)) in steps.iter().zip(&want).zip(&got).enumerate() {
        if w != g {
            let k = w
                .bytes
                .iter()
                .zip(&g.bytes)
                .take_while(|(a, b)| a == b)
                .count();
            let line = w.bytes[..k].iter().filter(|&&c| c == b'\n').count() + 1;
            report.push_str(&format!(
                "\n=== case {name}, step {i}: memcached sent {} bytes ({:?}), {} sent {} bytes \
                 ({:?}); first difference at byte {k} (line {line})",
                w.bytes.len(),
                w.end,
                target.name(),
                g.bytes.len(),
                g.end,
            ));
            report.push_str(&format!(
                "\n=== case {name}, step {i}: MISMATCH\n--- request:\n{}\n--- memcached ({:?}):\n{}\n--- {} ({:?}):\n{}\n",
                describe(s),
                w.end,
                escape(&w.bytes),
                target.name(),
                g.end,
                escape(&g.bytes),
            ));
        }
    }
    if !report.is_empty() {
        panic!("{report}\n{}", target.diagnostics());
    }
}

macro_rules! case {
    ($name:ident, $steps:expr) => {
        #[test]
        fn $name() {
            run_case(stringify!($name), $steps);
        }
    };
}

/// A case run with `--hash magent`, whose placement does not depend on the
/// shards' (random) ports, so that `meta_case_keys_use_both_shards` can
/// check that the case's keys really use both shards. The hash only decides
/// placement, not how a command is handled.
macro_rules! spread_case {
    ($name:ident, $steps:expr) => {
        #[test]
        fn $name() {
            run_case_with(stringify!($name), $steps, &["--hash", "magent"]);
        }
    };
}

// ---------------------------------------------------------------------------
// Topology sanity (not differential): keys really spread over both shards.
// ---------------------------------------------------------------------------

#[test]
fn keys_spread_over_all_backends() {
    let target = Target::start(&[]);
    let ks = keys("spread-", 64);
    let mut c = Client::with_sentinel(&target.addr());
    let r = c.exchange(&set_all(&ks));
    assert_eq!(
        r.bytes,
        b"STORED\r\n".repeat(ks.len()),
        "{}",
        escape(&r.bytes)
    );

    let backends = target.backends();
    let mut holders: Vec<usize> = vec![0; ks.len()];
    let mut per_backend = vec![0usize; backends.len()];
    for (bi, b) in backends.iter().enumerate() {
        let mut bc = b.client();
        for (ki, k) in ks.iter().enumerate() {
            let r = bc.send_until(format!("get {k}\r\n").as_bytes(), complete_retrieval);
            let hit = format!("VALUE {k} 0 {}\r\nv-{k}\r\nEND\r\n", k.len() + 2).into_bytes();
            if r.bytes == hit {
                holders[ki] += 1;
                per_backend[bi] += 1;
            } else {
                assert_eq!(
                    r.bytes,
                    b"END\r\n",
                    "backend {}: {}",
                    b.addr(),
                    escape(&r.bytes)
                );
            }
        }
    }
    for (k, n) in ks.iter().zip(&holders) {
        assert_eq!(
            *n, 1,
            "key {k} is held by {n} backends, expected exactly one"
        );
    }
    for (b, n) in backends.iter().zip(&per_backend) {
        assert!(
            *n > 0,
            "backend {} holds none of {} keys: no sharding",
            b.addr(),
            ks.len()
        );
    }
}

// ---------------------------------------------------------------------------
// Retrieval: get / gets / gat / gats
// ---------------------------------------------------------------------------

case!(get_one_key, vec![ex(set("k1", "hello")), ex(b"get k1\r\n")]);

case!(get_missing_key, vec![ex(b"get nosuchkey\r\n")]);

case!(
    get_no_key_is_error,
    vec![ex(b"get\r\n"), ex(b"get \r\n"), ex(b"gets\r\n")]
);

case!(get_many_keys, {
    let ks = keys("many", 10);
    vec![ex(set_all(&ks)), ex(get_line("get", &ks))]
});

case!(get_many_keys_some_missing, {
    let ks = keys("some", 10);
    let mut asked = Vec::new();
    for k in &ks {
        asked.push(k.clone());
        asked.push(format!("missing-{k}"));
    }
    vec![
        ex(set_all(&ks[..5])),
        ex(get_line("get", &asked)),
        ex(get_line("get", &asked[10..])),
    ]
});

case!(get_all_missing_many_keys, {
    let ks = keys("absent", 30);
    vec![ex(get_line("get", &ks)), ex(get_line("gets", &ks))]
});

case!(get_keys_spread_over_shards_keeps_order, {
    let ks = keys("order-", 40);
    let mut rev = ks.clone();
    rev.reverse();
    vec![
        ex(set_all(&ks)),
        ex(get_line("get", &ks)),
        ex(get_line("get", &rev)),
    ]
});

case!(get_duplicate_keys, {
    vec![
        ex(set("dup-a", "A")),
        ex(set("dup-b", "B")),
        ex(b"get dup-a dup-a dup-b dup-a missing dup-b\r\n"),
        ex(b"gets dup-b dup-b\r\n"),
    ]
});

case!(get_1200_keys, {
    let ks = keys("big-get-", 1200);
    let mut asked = ks.clone();
    asked.extend(keys("big-miss-", 50));
    asked.extend(ks[..10].iter().cloned());
    vec![
        ex(set_all(&ks[..1100])),
        ex(get_line("get", &asked)),
        ex(get_line("gets", &asked)),
    ]
});

case!(get_binary_value_and_flags, {
    let val = b"a\r\nb\0c\r\nEND\r\nVALUE x 0 1\r\n\xff\xfe";
    vec![
        ex(store("set", "bin", 4294967295, 0, val)),
        ex(store("set", "zero", 0, 0, b"")),
        ex(store("set", "flag1", 1, 0, b"1")),
        ex(b"get bin zero flag1\r\n"),
        ex(b"gets zero\r\n"),
    ]
});

case!(get_multiple_spaces_and_trailing_space, {
    vec![
        ex(set("sp1", "x")),
        ex(set("sp2", "y")),
        ex(b"get  sp1   sp2 \r\n"),
        ex(b"get sp1 \r\n"),
    ]
});

case!(
    gets_one_key,
    vec![ex(set("g1", "v")), ex(b"gets g1\r\n"), ex(b"gets nope\r\n")]
);

case!(gets_many_keys_across_shards, {
    let ks = keys("gets-", 20);
    vec![ex(set_all(&ks)), ex(get_line("gets", &ks))]
});

case!(gat_hit_and_miss, {
    vec![
        ex(set("gat1", "v1")),
        ex(set("gat2", "v2")),
        ex(b"gat 100 gat1 nope gat2\r\n"),
        ex(b"get gat1 gat2\r\n"),
    ]
});

case!(
    gats_shows_cas,
    vec![ex(set("gats1", "v")), ex(b"gats 0 gats1 nope\r\n")]
);

case!(gat_negative_exptime_expires, {
    vec![
        ex(set("gatneg", "v")),
        ex(b"gat -1 gatneg\r\n"),
        ex(b"get gatneg\r\n"),
    ]
});

case!(gat_bad_arguments, {
    vec![
        ex(set("gatbad", "v")),
        ex(b"gat\r\n"),
        ex(b"gat 10\r\n"),
        ex(b"gats 10\r\n"),
        ex(b"gat abc gatbad\r\n"),
        ex(b"gat 1x gatbad\r\n"),
        ex(b"get gatbad\r\n"),
    ]
});

case!(gat_many_keys_across_shards, {
    let ks = keys("gatm-", 20);
    let mut line = b"gat 300 ".to_vec();
    line.extend_from_slice(ks.join(" ").as_bytes());
    line.extend_from_slice(b"\r\n");
    vec![ex(set_all(&ks)), ex(line)]
});

case!(get_large_values_across_shards, {
    // Replies bigger than socket buffers, from both shards, in key order.
    let ks = keys("lv-", 24);
    let mut sets = Vec::new();
    for (i, k) in ks.iter().enumerate() {
        let val: Vec<u8> = (0..100_000 + i)
            .map(|j| b'a' + ((i + j) % 26) as u8)
            .collect();
        sets.extend(store("set", k, i as u32, 0, &val));
    }
    let mut rev = ks.clone();
    rev.reverse();
    vec![
        ex(sets),
        ex(get_line("get", &ks)),
        ex(get_line("gets", &rev)),
    ]
});

// ---------------------------------------------------------------------------
// Storage: set / add / replace / append / prepend / cas
// ---------------------------------------------------------------------------

case!(set_and_overwrite, {
    vec![
        ex(set("s1", "one")),
        ex(b"get s1\r\n"),
        ex(set("s1", "two!")),
        ex(b"get s1\r\n"),
    ]
});

case!(set_with_flags, {
    vec![
        ex(store("set", "f1", 123, 0, b"x")),
        ex(store("set", "f2", 4294967295, 0, b"y")),
        ex(b"get f1 f2\r\n"),
    ]
});

case!(set_flags_out_of_u32_range, {
    vec![
        ex(store("set", "fbig", 0, 0, b"x").replace_first(b" 0 0 ", b" 4294967296 0 ")),
        ex(b"get fbig\r\n"),
    ]
});

case!(set_negative_exptime_expires_immediately, {
    vec![ex(store("set", "neg", 0, -1, b"x")), ex(b"get neg\r\n")]
});

case!(set_absolute_exptime_in_past_expires, {
    // exptime > 30 days is an absolute unix time: 1970 + 31 days is past.
    vec![
        ex(store("set", "abs", 0, 2_678_400, b"x")),
        ex(b"get abs\r\n"),
    ]
});

case!(set_exptime_in_future_is_kept, {
    vec![ex(store("set", "fut", 0, 1000, b"x")), ex(b"get fut\r\n")]
});

case!(set_large_value_under_limit, {
    let val = vec![b'v'; 1_000_000];
    vec![ex(store("set", "large", 0, 0, &val)), ex(b"get large\r\n")]
});

case!(add_new_and_existing, {
    vec![
        ex(store("add", "a1", 0, 0, b"first")),
        ex(store("add", "a1", 0, 0, b"second")),
        ex(b"get a1\r\n"),
    ]
});

case!(replace_missing_and_existing, {
    vec![
        ex(store("replace", "r1", 0, 0, b"nope")),
        ex(b"get r1\r\n"),
        ex(set("r1", "orig")),
        ex(store("replace", "r1", 5, 0, b"new")),
        ex(b"get r1\r\n"),
    ]
});

case!(append_prepend, {
    vec![
        ex(store("append", "ap", 0, 0, b"x")),
        ex(store("prepend", "ap", 0, 0, b"x")),
        ex(b"get ap\r\n"),
        ex(store("set", "ap", 7, 0, b"mid")),
        ex(store("append", "ap", 9, 0, b"-end")),
        ex(store("prepend", "ap", 9, 0, b"start-")),
        ex(b"gets ap\r\n"),
    ]
});

case!(
    cas_missing_key,
    vec![ex(b"cas nokey 0 0 1 12345\r\nx\r\n"), ex(b"get nokey\r\n")]
);

case!(cas_fresh_then_stale, {
    vec![
        ex(set("c1", "v1")),
        ex(b"gets c1\r\n"),
        ex(b"cas c1 0 0 2 $CAS(c1)\r\nv2\r\n"),
        // The same id is stale now.
        ex(b"cas c1 0 0 2 $CAS(c1)\r\nv3\r\n"),
        ex(b"gets c1\r\n"),
        ex(b"cas c1 3 0 2 $CAS(c1)\r\nv4\r\n"),
        ex(b"gets c1\r\n"),
    ]
});

case!(cas_stale_after_set, {
    vec![
        ex(set("c2", "v1")),
        ex(b"gets c2\r\n"),
        ex(set("c2", "v2")),
        ex(b"cas c2 0 0 2 $CAS(c2)\r\nv3\r\n"),
        ex(b"get c2\r\n"),
    ]
});

case!(cas_after_delete_is_not_found, {
    vec![
        ex(set("c3", "v1")),
        ex(b"gets c3\r\n"),
        ex(b"delete c3\r\n"),
        ex(b"cas c3 0 0 2 $CAS(c3)\r\nv2\r\n"),
    ]
});

case!(cas_bad_arguments, {
    vec![
        ex(set("c4", "v")),
        ex(b"cas c4 0 0 1\r\nx\r\n"),
        ex(b"cas c4 0 0 1 abc\r\nx\r\n"),
        ex(b"cas c4 0 0 1 -1\r\nx\r\n"),
        ex(b"cas c4 0 0 1 18446744073709551616\r\nx\r\n"),
        ex(b"get c4\r\n"),
    ]
});

case!(gets_cas_unchanged_without_writes, {
    // Both gets must print the same id on each side; `cas` with it works.
    vec![
        ex(set("c5", "v")),
        ex(b"gets c5\r\n"),
        ex(b"get c5\r\n"),
        ex(b"touch c5 100\r\n"),
        ex(b"cas c5 0 0 1 $CAS(c5)\r\nw\r\n"),
        ex(b"get c5\r\n"),
    ]
});

// ---------------------------------------------------------------------------
// delete
// ---------------------------------------------------------------------------

case!(delete_hit_and_miss, {
    vec![
        ex(set("d1", "v")),
        ex(b"delete d1\r\n"),
        ex(b"delete d1\r\n"),
        ex(b"get d1\r\n"),
    ]
});

case!(delete_legacy_time_argument, {
    vec![
        ex(set("d2", "v")),
        ex(b"delete d2 5\r\n"),
        ex(b"delete d2 0\r\n"),
        ex(b"delete d2 0\r\n"),
        ex(b"delete d2 x y\r\n"),
        ex(b"delete\r\n"),
    ]
});

// ---------------------------------------------------------------------------
// incr / decr
// ---------------------------------------------------------------------------

case!(incr_decr_basic, {
    vec![
        ex(set("n1", "10")),
        ex(b"incr n1 5\r\n"),
        ex(b"decr n1 3\r\n"),
        ex(b"get n1\r\n"),
        ex(b"incr n1 0\r\n"),
    ]
});

case!(
    incr_missing_key,
    vec![ex(b"incr nokey 1\r\n"), ex(b"decr nokey 1\r\n")]
);

case!(incr_wraps_at_u64_max, {
    vec![
        ex(set("n2", "18446744073709551615")),
        ex(b"incr n2 1\r\n"),
        ex(b"get n2\r\n"),
        ex(set("n3", "18446744073709551610")),
        ex(b"incr n3 10\r\n"),
    ]
});

case!(decr_below_zero_stops_at_zero, {
    vec![
        ex(set("n4", "5")),
        ex(b"decr n4 10\r\n"),
        ex(b"get n4\r\n"),
        ex(b"decr n4 1\r\n"),
    ]
});

case!(incr_decr_length_changes, {
    vec![
        ex(set("n5", "10")),
        ex(b"decr n5 1\r\n"),
        ex(b"get n5\r\n"),
        ex(set("n6", "99")),
        ex(b"incr n6 1\r\n"),
        ex(b"get n6\r\n"),
    ]
});

case!(incr_non_numeric_value, {
    vec![
        ex(set("n7", "abc")),
        ex(b"incr n7 1\r\n"),
        ex(b"decr n7 1\r\n"),
        ex(set("n8", " 5")),
        ex(b"incr n8 1\r\n"),
        ex(set("n9", "5 ")),
        ex(b"incr n9 1\r\n"),
        ex(set("n10", "")),
        ex(b"incr n10 1\r\n"),
        ex(set("n11", "123456789012345678901")),
        ex(b"incr n11 1\r\n"),
    ]
});

case!(incr_huge_delta, {
    vec![
        ex(set("n12", "1")),
        ex(b"incr n12 18446744073709551615\r\n"),
        ex(b"incr n12 18446744073709551616\r\n"),
        ex(b"decr n12 18446744073709551615\r\n"),
        ex(b"incr n12 99999999999999999999999999\r\n"),
    ]
});

case!(incr_invalid_delta, {
    vec![
        ex(set("n13", "1")),
        ex(b"incr n13 abc\r\n"),
        ex(b"incr n13 -1\r\n"),
        ex(b"incr n13 1x\r\n"),
        ex(b"incr n13 +1\r\n"),
        ex(b"incr n13 01\r\n"),
        ex(b"decr n13 x\r\n"),
        ex(b"incr n13\r\n"),
        ex(b"incr\r\n"),
        ex(b"get n13\r\n"),
    ]
});

// ---------------------------------------------------------------------------
// touch
// ---------------------------------------------------------------------------

case!(touch_hit_miss_and_expire, {
    vec![
        ex(set("t1", "v")),
        ex(b"touch t1 100\r\n"),
        ex(b"touch nokey 100\r\n"),
        ex(b"get t1\r\n"),
        ex(b"touch t1 -1\r\n"),
        ex(b"get t1\r\n"),
    ]
});

case!(touch_bad_arguments, {
    vec![
        ex(set("t2", "v")),
        ex(b"touch t2 abc\r\n"),
        ex(b"touch t2\r\n"),
        ex(b"touch\r\n"),
        ex(b"touch t2 1x\r\n"),
        ex(b"get t2\r\n"),
    ]
});

// ---------------------------------------------------------------------------
// flush_all
// ---------------------------------------------------------------------------

case!(flush_all_immediate, {
    let ks = keys("fl-", 20);
    vec![
        ex(set_all(&ks)),
        fresh(b"flush_all\r\n"),
        ex(get_line("get", &ks)),
    ]
});

case!(flush_all_zero_delay, {
    let ks = keys("fz-", 20);
    vec![
        ex(set_all(&ks)),
        fresh(b"flush_all 0\r\n"),
        ex(get_line("get", &ks)),
        ex(set("fz-new", "x")),
        ex(b"get fz-new\r\n"),
    ]
});

case!(flush_all_noreply, {
    let ks = keys("fn-", 20);
    vec![
        ex(set_all(&ks)),
        fresh(b"flush_all noreply\r\n"),
        ex(get_line("get", &ks)),
    ]
});

// A delay of 3 s leaves memcached's flush time 2 s ahead, so the items are
// still there right after the flush even if its clock ticks meanwhile.
case!(flush_all_noreply_then_get_in_one_write, {
    // The flush must reach every shard before the following get is served.
    let ks = keys("fo-", 20);
    let mut req = b"flush_all noreply\r\n".to_vec();
    req.extend(get_line("get", &ks));
    vec![ex(set_all(&ks)), fresh(req)]
});

case!(flush_all_then_set_in_one_write, {
    let ks = keys("fs-", 20);
    let mut req = b"flush_all\r\n".to_vec();
    req.extend(set_all(&ks[..10]));
    req.extend(get_line("get", &ks));
    vec![ex(set_all(&ks)), fresh(req)]
});

case!(flush_all_delayed, {
    let ks = keys("fd-", 10);
    vec![
        ex(set_all(&ks)),
        ex(b"flush_all 3\r\n"),
        ex(get_line("get", &ks)),
        wait_gone(&ks),
    ]
});

case!(flush_all_delayed_noreply, {
    let ks = keys("fdn-", 10);
    vec![
        ex(set_all(&ks)),
        ex(b"flush_all 3 noreply\r\n"),
        ex(get_line("get", &ks)),
        wait_gone(&ks),
    ]
});

case!(flush_all_bad_arguments, {
    vec![
        ex(set("fb", "v")),
        ex(b"flush_all x\r\n"),
        ex(b"flush_all 1x\r\n"),
        ex(b"get fb\r\n"),
        fresh(b"flush_all -1\r\n"),
        ex(b"get fb\r\n"),
    ]
});

// ---------------------------------------------------------------------------
// verbosity / version / stats / quit
// ---------------------------------------------------------------------------

case!(verbosity, {
    vec![
        ex(b"verbosity 1\r\n"),
        ex(b"verbosity 0\r\n"),
        ex(b"verbosity\r\n"),
        ex(b"verbosity x\r\n"),
        ex(b"verbosity 1 2\r\n"),
        ex(b"verbosity 0 noreply\r\n"),
        ex(b"verbosity 0\r\n"),
    ]
});

case!(
    version_framing,
    vec![
        Step::Version,
        ex(set("ver", "v")),
        Step::Version,
        ex(b"get ver\r\n")
    ]
);

case!(
    stats_framing,
    vec![
        Step::Stats,
        ex(set("st", "v")),
        Step::Stats,
        ex(b"get st\r\n")
    ]
);

case!(quit_closes_connection, vec![until_close(b"quit\r\n")]);

case!(quit_ignores_following_requests, {
    vec![ex(set("q1", "v")), until_close(b"quit\r\nget q1\r\n")]
});

case!(quit_after_pipelined_get, {
    vec![
        ex(set("q2", "v")),
        until_close(b"get q2\r\nquit\r\n"),
        Step::Reconnect,
        ex(b"get q2\r\n"),
    ]
});

case!(quit_with_argument, vec![until_close(b"quit now\r\n")]);

// ---------------------------------------------------------------------------
// noreply
// ---------------------------------------------------------------------------

case!(noreply_set_add_replace, {
    vec![
        ex(b"set nr1 0 0 1 noreply\r\na\r\n"),
        ex(b"add nr1 0 0 1 noreply\r\nb\r\n"),
        ex(b"add nr2 0 0 1 noreply\r\nc\r\n"),
        ex(b"replace nr1 0 0 1 noreply\r\nd\r\n"),
        ex(b"replace nr3 0 0 1 noreply\r\ne\r\n"),
        ex(b"get nr1 nr2 nr3\r\n"),
    ]
});

case!(noreply_append_prepend, {
    vec![
        ex(set("nr4", "mid")),
        ex(b"append nr4 0 0 4 noreply\r\n-end\r\n"),
        ex(b"prepend nr4 0 0 6 noreply\r\nstart-\r\n"),
        ex(b"append nr5 0 0 1 noreply\r\nx\r\n"),
        ex(b"get nr4 nr5\r\n"),
    ]
});

case!(noreply_cas, {
    vec![
        ex(set("nr6", "v1")),
        ex(b"gets nr6\r\n"),
        ex(b"cas nr6 0 0 2 $CAS(nr6) noreply\r\nv2\r\n"),
        ex(b"cas nr6 0 0 2 $CAS(nr6) noreply\r\nv3\r\n"),
        ex(b"cas nr7 0 0 2 1 noreply\r\nv4\r\n"),
        ex(b"get nr6 nr7\r\n"),
    ]
});

case!(noreply_delete_incr_decr_touch, {
    vec![
        ex(set("nr8", "v")),
        ex(set("nr9", "10")),
        ex(b"delete nr8 noreply\r\n"),
        ex(b"delete nr8 noreply\r\n"),
        ex(b"incr nr9 5 noreply\r\n"),
        ex(b"decr nr9 2 noreply\r\n"),
        ex(b"incr nokey 1 noreply\r\n"),
        ex(b"touch nr9 100 noreply\r\n"),
        ex(b"touch nokey 100 noreply\r\n"),
        ex(b"get nr8 nr9\r\n"),
    ]
});

case!(noreply_many_in_one_write_then_get, {
    vec![
        ex(set("nr10", "5")),
        ex(cat(&[
            b"set nr11 1 0 3 noreply\r\nabc\r\n",
            b"add nr12 2 0 3 noreply\r\ndef\r\n",
            b"append nr11 0 0 1 noreply\r\nX\r\n",
            b"prepend nr12 0 0 1 noreply\r\nY\r\n",
            b"incr nr10 10 noreply\r\n",
            b"decr nr10 3 noreply\r\n",
            b"replace nr13 0 0 1 noreply\r\nZ\r\n",
            b"delete nr13 noreply\r\n",
            b"touch nr11 500 noreply\r\n",
            b"verbosity 0 noreply\r\n",
            b"get nr10 nr11 nr12 nr13\r\n",
        ])),
    ]
});

case!(noreply_errors_are_still_reported, {
    vec![
        ex(set("nr14", "abc")),
        ex(b"incr nr14 1 noreply\r\n"),
        ex(b"incr nr14 x noreply\r\n"),
        ex(b"touch nr14 x noreply\r\n"),
        ex(b"set nr15 0 0 x noreply\r\nab\r\n"),
        ex(b"set nr15 0 0 1 noreply\r\nabc\r\n"),
        ex(b"get nr14 nr15\r\n"),
    ]
});

case!(noreply_misspelled_is_not_noreply, {
    vec![
        ex(b"set nr16 0 0 1 norepl\r\na\r\n"),
        ex(b"delete nr16 NOREPLY\r\n"),
        ex(b"get nr16\r\n"),
    ]
});

// ---------------------------------------------------------------------------
// Meta protocol (mg ms md ma mn). `me` output and CAS tokens differ between
// servers by nature and are left out; TTLs are only asked of items that
// have none (t-1), so timing cannot change a reply.
// ---------------------------------------------------------------------------

case!(
    meta_set_get_flags,
    vec![
        ex(b"ms mk1 3 F5\r\nabc\r\nmg mk1 v f s k O1\r\nmg mk1\r\nmg mk1 t v\r\nmg mk1 h l\r\n"),
        ex(b"mg mk-missing v k O2\r\nmg mk-missing\r\n"),
    ]
);

case!(meta_quiet_pipeline_across_shards, {
    let mut p = Vec::new();
    for i in 0..12 {
        p.extend(format!("ms mq-{i} 2 q\r\nv{}\r\n", i % 10).into_bytes());
    }
    for i in 0..16 {
        p.extend(format!("mg mq-{i} v q k O{i}\r\n").into_bytes());
    }
    p.extend(b"mn\r\n");
    for i in 0..16 {
        p.extend(format!("md mq-{i} q O{i}\r\n").into_bytes());
    }
    p.extend(b"mn\r\nmg mq-1 v\r\n");
    vec![ex(p)]
});

case!(
    meta_delete,
    vec![
        ex(b"ms md1 1\r\nx\r\nmd md1\r\nmd md1\r\nmd md1 q\r\nmd md1 O7 k\r\nmn\r\n"),
        ex(b"ms md2 1\r\nx\r\nmd md2 q\r\nmg md2 v\r\nmn\r\n"),
    ]
);

case!(meta_arithmetic, vec![ex(
    b"ma mc1\r\nma mc1 N0 J5 v\r\nma mc1 v D3\r\nma mc1 MD v D100\r\nma mc1 q\r\nma mc1 q v\r\nmn\r\nmg mc1 v\r\nms mc2 3\r\nabc\r\nma mc2 v\r\nma mc1 MX\r\n"
)]);

case!(meta_set_modes, vec![ex(
    b"ms mm1 1 ME\r\na\r\nms mm1 1 ME\r\nb\r\nms mm2 1 MR\r\nc\r\nms mm1 1 MA\r\nd\r\nms mm1 1 MP\r\ne\r\nms mm1 1 MS\r\nf\r\nms mm3 1 MA\r\ng\r\nmg mm1 v\r\nmg mm2 v\r\nmg mm3 v\r\n"
)]);

case!(meta_cas, vec![
    ex(b"set mcas 0 0 1\r\na\r\ngets mcas\r\n"),
    ex(b"ms mcas 1 C$CAS(mcas)\r\nb\r\nms mcas 1 C$CAS(mcas)\r\nc\r\nmg mcas v\r\nmd mcas C1\r\nmg mcas v\r\n"),
]);

case!(meta_base64_keys, vec![ex(
    b"ms Zm9vYg== 2 b\r\nxy\r\nmg Zm9vYg== b v k\r\nget foob\r\nmd Zm9vYg== b q\r\nmn\r\nget foob\r\nmg !!!! b v\r\n"
)]);

case!(
    meta_bad_lines,
    vec![
        ex(b"mg\r\nms\r\nmd\r\nma\r\nmx k\r\n"),
        ex(b"ms k\r\nms k x\r\nms k -1\r\n"),
        ex(b"ms k 2 MX\r\nab\r\nmg k zz\r\nmg k v v\r\nmd k q q\r\nma k q q\r\nmg k q q\r\n"),
        ex(b"ms k 1\r\nabc\r\nmg k v\r\n"),
        ex(format!(
            "mg {} v\r\nms {} 1\r\nx\r\n",
            "k".repeat(251),
            "k".repeat(251)
        )),
        ex(format!(
            "mg k {}\r\nms k 1 {}\r\nx\r\n",
            vec!["v"; 20].join(" "),
            vec!["T1"; 18].join(" ")
        )),
    ]
);

case!(
    meta_value_too_large,
    vec![ex(format!(
        "ms big 2000000\r\n{}\r\nmg big v\r\n",
        "x".repeat(2_000_000)
    )),]
);

case!(meta_mixed_with_classic_pipeline, vec![ex(
    b"set mix1 3 0 2\r\nab\r\nmg mix1 v f\r\nget mix1 mix2\r\nms mix2 2 q F9\r\ncd\r\nget mix1 mix2\r\nmg mix3 q v\r\nincr mix3 1\r\nma mix3 q\r\nmn\r\ndelete mix1\r\nmg mix1 v\r\n"
)]);

// ---------------------------------------------------------------------------
// Meta protocol, flag by flag: every flag memcached 1.6.18 accepts (and the
// ones it rejects: `E`, `S`, `x`), quiet mode, base64 keys, malformed lines.
// Each case's keys fall on both shards (`meta_case_keys_use_both_shards`).
// Cas values in meta replies (`c` flag) are masked as `c<cas>` and can be
// sent back with `$CAS(key)` when the reply also carried `k`.
// TTLs are printed (`t`) only for items without one.
// ---------------------------------------------------------------------------

/// Standard base64 with padding, for `b` keys.
fn b64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk.len();
        let word = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= n {
                out.push(A[(word >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `ms KEY LEN [FLAGS]\r\nVAL\r\n`.
fn ms(key: &str, flags: &str, val: &[u8]) -> Vec<u8> {
    let mut v = if flags.is_empty() {
        format!("ms {key} {}\r\n", val.len())
    } else {
        format!("ms {key} {} {flags}\r\n", val.len())
    }
    .into_bytes();
    v.extend_from_slice(val);
    v.extend_from_slice(b"\r\n");
    v
}

/// `f(key)` for every key, concatenated.
fn each(keys: &[String], f: impl Fn(&str) -> String) -> Vec<u8> {
    keys.iter().flat_map(|k| f(k).into_bytes()).collect()
}

/// Keys decoded from base64 in these cases: spaces, control bytes, CR LF,
/// non-UTF-8 and UTF-8 bytes, and a plain one (reachable by `get` too).
fn binary_keys() -> Vec<Vec<u8>> {
    vec![
        b"a b".to_vec(),
        b"\x00\x01\xff".to_vec(),
        b"x\r\ny".to_vec(),
        b" lead".to_vec(),
        b"trail ".to_vec(),
        "\u{20ac} key".as_bytes().to_vec(),
        b"mbk-0".to_vec(),
        b"mbk-1".to_vec(),
    ]
}

spread_case!(meta_get_return_flags, {
    let ks = keys("mgf-", 4);
    let mut setup = Vec::new();
    for (i, k) in ks.iter().enumerate() {
        setup.extend(store(
            "set",
            k,
            7 + i as u32,
            0,
            format!("val-{i}").as_bytes(),
        ));
    }
    vec![
        ex(setup),
        ex(each(&ks, |k| {
            format!(
                "mg {k} k v f s O{k}\r\nmg {k}\r\nmg {k} v\r\nmg {k} f\r\nmg {k} s k\r\nmg {k} t\r\nmg {k} t v f\r\nmg {k} O9 k s t f v\r\nmg {k} k\r\n"
            )
        })),
        ex(b"mg mgf-8 k v f t s O77\r\nmg mgf-9 s\r\nmg mgf-9 k\r\nmg mgf-8 O12345678901234567890123456789012 k\r\nmg mgf-0 O v\r\n"),
        // The value is never mistaken for reply lines.
        ex(cat(&[
            &ms("mgf-2", "", b"VA 1 c5\r\nEN"),
            b"mg mgf-2 v k\r\nmg mgf-3 v k\r\n",
        ])),
    ]
});

spread_case!(meta_get_hit_last_access_no_bump, {
    let ks = keys("mgh-", 4);
    // All in one write: `l` (seconds since last access) cannot tick.
    vec![ex(each(&ks, |k| {
        format!(
            "ms {k} 1\r\nx\r\nmg {k} h l\r\nmg {k} h l v\r\nmg {k} u h l\r\nmg {k} u v\r\nmg {k} h\r\nset {k}c 0 0 1\r\ny\r\nmg {k}c h l k\r\nmg {k}c h\r\nmg {k}-miss h l u\r\n"
        )
    }))]
});

spread_case!(meta_get_quiet, {
    let ks = keys("mgq-", 6);
    let mut setup = Vec::new();
    for k in ks.iter().step_by(2) {
        setup.extend(ms(k, "F3", b"hit"));
    }
    vec![
        ex(setup),
        ex(cat(&[
            &each(&ks, |k| {
                format!(
                    "mg {k} q\r\nmg {k} q v\r\nmg {k} q k O1\r\nmg {k} q f s\r\nmg {k} q v k O{k}\r\n"
                )
            }),
            b"mn\r\n",
        ])),
        // A suppressed miss right before a normal reply, no mn.
        ex(b"mg mgq-1 q v\r\nmg mgq-0 v\r\nmg mgq-3 q\r\nmg mgq-5 q k\r\nmg mgq-2 k\r\n"),
    ]
});

spread_case!(meta_get_touch_and_recache, {
    vec![ex(cat(&[
        &ms("mgr-0", "T100", b"a"),
        &ms("mgr-1", "", b"b"),
        &ms("mgr-2", "T100", b"c"),
        b"mg mgr-0 R50 v\r\nmg mgr-0 R200 v\r\nmg mgr-0 R200 v\r\nmg mgr-0 v\r\nmg mgr-0 k s\r\n",
        b"mg mgr-0 T0 v\r\nmg mgr-0 t v\r\n",
        b"mg mgr-1 T-1 v\r\nmg mgr-1 v\r\nmg mgr-1 k\r\n",
        b"mg mgr-2 R200 q v\r\nmg mgr-2 R200 q k\r\nmg mgr-3 T100 s\r\nmg mgr-3 R30 v\r\n",
        b"mg mgr-1 R30 v\r\nms mgr-1 1\r\nd\r\nmg mgr-1 R30 v t\r\nmg mgr-2 T0 R5 t v\r\nmn\r\n",
    ]))]
});

spread_case!(meta_get_vivify_lease, {
    vec![ex(b"mg mgn-0 N30 v\r\nmg mgn-0 N30 v\r\nmg mgn-0 N30 s k\r\nms mgn-0 3 T0\r\nnew\r\nmg mgn-0 v\r\nmg mgn-0 N30 v\r\nmg mgn-1 N30\r\nmg mgn-1 q N30\r\nmd mgn-1 q\r\nmg mgn-1 N30 q v\r\nmg mgn-1 N30 q v\r\nmn\r\nmg mgn-2 N0 k f s v\r\nmg mgn-3 N30 R10 v\r\nmg mgn-3 v\r\nmg mgn-2 t v\r\n")]
});

spread_case!(meta_lease_invalidate, {
    vec![
        ex(b"ms mgi-0 2 T0\r\nv0\r\nms mgi-1 2\r\nv1\r\nmg mgi-0 k c\r\nmg mgi-1 k c\r\n"),
        ex(b"md mgi-0 I T30\r\nmg mgi-0 v\r\nmg mgi-0 v\r\nms mgi-0 2 I C$CAS(mgi-0)\r\nw0\r\nmg mgi-0 v\r\nms mgi-0 2 T0\r\nok\r\nmg mgi-0 v\r\n"),
        ex(b"md mgi-1 I\r\nmg mgi-1 v s\r\nmd mgi-1 I q\r\nmg mgi-1 v\r\nmd mgi-1\r\nmd mgi-2 I\r\nmg mgi-2 v\r\nmd mgi-3 T30\r\nms mgi-3 1\r\nx\r\nmd mgi-3 T30\r\nmg mgi-3 v\r\nmn\r\n"),
        ex(b"ms mgi-1 1 I\r\nz\r\nmg mgi-1 v k c\r\nms mgi-1 1 I C$CAS(mgi-1)\r\ny\r\nmg mgi-1 v\r\n"),
    ]
});

spread_case!(meta_set_flags, {
    vec![
        ex(cat(&[
            &ms("msf-0", "F5 T0", b"abc"),
            &ms("msf-1", "F4294967295 k O7 s", b"abcd"),
            &ms("msf-2", "c", b"x"),
            &ms("msf-3", "c k", b"y"),
            &ms("msf-4", "F0 T0", b""),
            &ms("msf-5", "F4294967296", b"ov"),
            &ms("msf-6", "T-1", b"gone"),
            &ms("msf-7", "k O1 q", b"quiet"),
            b"mn\r\n",
        ])),
        ex(cat(&[
            &each(&keys("msf-", 8), |k| format!("mg {k} v f s k\r\n")),
            b"get msf-0 msf-1 msf-2 msf-3 msf-4 msf-5 msf-6 msf-7\r\n",
        ])),
        ex(cat(&[
            &ms("msf-1", "I", b"i"),
            &ms("msf-0", "S3", b"abc"),
            &ms("msf-0", "E77", b"abc"),
            &ms("msf-2", "F7 F8", b"ff"),
            &ms("msf-3", "s s", b"ss"),
            b"mg msf-0 v f\r\nmg msf-1 v f\r\nmg msf-2 v f\r\nmg msf-3 v\r\n",
        ])),
    ]
});

spread_case!(meta_set_cas, {
    vec![
        ex(b"ms msc-0 1\r\na\r\nms msc-1 1\r\nb\r\nmg msc-0 k c\r\nmg msc-1 k c\r\n"),
        ex(cat(&[
            &ms("msc-0", "C$CAS(msc-0) c k", b"A"),
            &ms("msc-0", "C$CAS(msc-0)", b"B"),
            &ms("msc-2", "C123", b"c"),
            &ms("msc-1", "C$CAS(msc-1) q", b"q"),
            &ms("msc-1", "C1 q", b"x"),
            &ms("msc-3", "C1 q", b"y"),
            b"mn\r\nmg msc-0 v\r\nmg msc-1 v\r\nmg msc-1 k c\r\n",
        ])),
        ex(cat(&[
            ms(&b64(b"msc-1"), "b C$CAS(msc-1) k c", b"w").as_slice(),
            &ms("msc-0", "C$CAS(msc-0) MA", b"+"),
            &ms("msc-0", "C$CAS(msc-0) MA", b"+"),
            b"mg msc-0 v\r\nmg msc-1 v\r\nget msc-1\r\n",
        ])),
    ]
});

spread_case!(meta_set_modes_full, {
    vec![
        ex(cat(&[
            &ms("msm-0", "ME F1", b"e0"),
            &ms("msm-0", "ME F2", b"e1"),
            &ms("msm-1", "MR", b"r0"),
            &ms("msm-0", "MR F3 s", b"r1"),
            &ms("msm-0", "MA s k", b"+a"),
            &ms("msm-0", "MP s", b"p+"),
            &ms("msm-2", "MA", b"a"),
            &ms("msm-2", "MA N0", b"a"),
            &ms("msm-3", "MP N30", b"p"),
            &ms("msm-4", "MS F9", b"s0"),
            &ms("msm-4", "MS T0", b"s1"),
            b"mg msm-0 v f\r\nmg msm-1 v\r\nmg msm-2 v\r\nmg msm-3 v\r\nmg msm-4 v f\r\n",
        ])),
        ex(cat(&[
            &ms("msm-5", "ME q", b"q0"),
            &ms("msm-5", "ME q", b"q1"),
            &ms("msm-1", "MR q", b"q2"),
            &ms("msm-5", "MA q", b"q3"),
            &ms("msm-6", "MP q", b"q4"),
            &ms("msm-5", "MS q", b"q5"),
            b"mn\r\nmg msm-5 v\r\n",
        ])),
        ex(cat(&[
            &ms("msm-0", "Ma", b"x"),
            &ms("msm-0", "Mx", b"x"),
            &ms("msm-0", "M", b"x"),
            &ms("msm-0", "MEE", b"x"),
            &ms("msm-0", "ME MR", b"x"),
            &ms("msm-1", "M1", b"x"),
            b"mg msm-0 v\r\nmg msm-1 v\r\n",
        ])),
    ]
});

spread_case!(meta_base64_binary_keys, {
    let bk = binary_keys();
    let mut set = Vec::new();
    let mut read = Vec::new();
    let mut del = Vec::new();
    for (i, k) in bk.iter().enumerate() {
        let e = b64(k);
        set.extend(ms(&e, &format!("b F{i} T0"), format!("bin-{i}").as_bytes()));
        set.extend(ms(&e, "b k O1 c", format!("bin-{i}").as_bytes()));
        read.extend(
            format!("mg {e} b k v f s\r\nmg {e} b\r\nmg {e} b q k\r\nma {e} b q\r\n").into_bytes(),
        );
        del.extend(format!("md {e} b q\r\nmd {e} b k O{i}\r\nmg {e} b v k q\r\nma {e} b N0 J{i} v k\r\nmd {e} b\r\n").into_bytes());
    }
    vec![
        ex(set),
        ex(read),
        ex(b"get mbk-0 mbk-1\r\ndelete mbk-0\r\nmg bWJrLTA= b v\r\n"),
        ex([del, b"mn\r\n".to_vec()].concat()),
    ]
});

spread_case!(
    meta_base64_bad_keys,
    vec![
        ex(b"mg ==== b v\r\nmg YSB b v\r\nmg YS=i b v\r\nmg !!!! b k\r\nmg YQ b v\r\n"),
        ex(b"ms !!!! 1 b\r\nx\r\nmd !!!! b\r\nma !!!! b\r\nmd YSB b q\r\nmn\r\n"),
        // Encoded: 240 and 252 characters (decoded 180 and 189 bytes).
        ex(format!(
            "mg {} b v\r\nms {} 1 b\r\nx\r\nmg {} b s\r\n",
            b64(&[b'z'; 189]),
            b64(&[b'z'; 180]),
            b64(&[b'z'; 180])
        )),
        // Without `b` the base64 text is just a key.
        ex(b"ms YSBi 1\r\nn\r\nmg YSBi v\r\nmg YSBi b v\r\n"),
    ]
);

spread_case!(meta_delete_flags, {
    let ks = keys("mdf-", 6);
    vec![
        ex(cat(&[
            &each(&ks, |k| format!("ms {k} 2\r\nv{}\r\n", &k[4..])),
            b"mg mdf-2 k c\r\n",
        ])),
        ex(cat(&[
            b"md mdf-0 k O5\r\nmd mdf-0 k O5\r\nmd mdf-1 q\r\nmd mdf-2 C1\r\nmd mdf-2 C$CAS(mdf-2) k\r\n",
            b"md mdf-3 q C1\r\nmd mdf-4 T30\r\n",
            format!("md {} b k\r\nmd {} b k O8\r\n", b64(b"mdf-5"), b64(b"mdf-5")).as_bytes(),
            b"md mdf-9 q\r\nmd mdf-9 q k O3\r\nmn\r\n",
        ])),
        ex(each(&ks, |k| format!("mg {k} v\r\n"))),
        ex(b"md mdf-3 x\r\nmd mdf-3 E5\r\nmd mdf-3 k k\r\nmd mdf-3 Cx\r\nmd mdf-3 C\r\nmd mdf-3 I Tx\r\nmg mdf-3 v\r\n"),
    ]
});

spread_case!(meta_arith_flags, {
    vec![
        ex(b"ma maf-0\r\nma maf-0 N0 J10 v t c k O3\r\nma maf-0 v\r\nma maf-0 MI D5 v\r\nma maf-0 M+ D5 v\r\nma maf-0 MD D3 v\r\nma maf-0 M- D100 v\r\nma maf-0 D18446744073709551615 v\r\nma maf-0 T0 v t\r\nma maf-0 k O4\r\nma maf-0 v k s\r\n"),
        ex(b"ma maf-1 N0\r\nma maf-1 q v\r\nma maf-1 v\r\nma maf-1 q MD D7 v\r\nma maf-1 v D0\r\nmn\r\nma maf-2 C1 v\r\nms maf-2 1\r\n5\r\nmg maf-2 k c\r\n"),
        ex(b"ma maf-2 C$CAS(maf-2) v c k\r\nma maf-2 C$CAS(maf-2) v\r\nma maf-2 C1 q\r\nmn\r\nma maf-3 N0 J18446744073709551615 v\r\nma maf-3 v\r\nma maf-3 MD v\r\n"),
        ex(format!(
            "ma {} b N0 J3 v k\r\nma {} b q\r\nmg maf-4 v\r\nma maf-9 q\r\nma maf-9 q k O2\r\nmn\r\n",
            b64(b"maf-4"),
            b64(b"maf-4")
        )),
        ex(b"ma maf-5 Dabc\r\nma maf-5 D\r\nma maf-5 Mx\r\nma maf-5 Mi\r\nma maf-5 E5\r\nma maf-5 N0 Jx\r\nma maf-5 Nx\r\nma maf-5 D-1\r\nma maf-5 D99999999999999999999\r\nma maf-5 v v\r\nms maf-5 2\r\nab\r\nma maf-5 v\r\nma maf-5 N0 J5 v\r\nmg maf-5 v\r\n"),
        ex(b"ms maf-6 20\r\n18446744073709551615\r\nma maf-6 v\r\nms maf-7 3\r\n 12\r\nma maf-7 v\r\nms maf-7 21\r\n184467440737095516150\r\nma maf-7 v\r\n"),
    ]
});

// memcached 1.6.18 answers a quiet `ma` that creates the item (`N`): only
// an increment of an existing item is silent.
spread_case!(
    meta_arith_quiet_autovivify_is_answered,
    vec![
        ex(b"ma mqa-0 N0 q\r\nma mqa-1 N0 q v\r\nma mqa-2 N0 J5 q v k\r\nma mqa-2 q v\r\nma mqa-0 q\r\nmn\r\n"),
        ex(b"mg mqa-0 v\r\nmg mqa-1 v\r\nmg mqa-2 v\r\n"),
    ]
);

spread_case!(
    meta_noop,
    vec![
        ex(b"mn\r\n"),
        ex(b"mn\r\nmn\r\nmn\r\n"),
        ex(b"mn extra tokens\r\nMN\r\nmn  \r\n"),
        ex(b"mg mnx-0 q\r\nmg mnx-1 q\r\nmn\r\nmd mnx-0 q\r\nmn\r\n"),
    ]
);

spread_case!(
    meta_debug_framing_only,
    // `me` of an existing item prints its cas and times: left out.
    vec![ex(
        b"me\r\nme mmf-0\r\nme mmf-1 v\r\nmg mmf-0 v\r\nme mmf-1\r\n"
    )]
);

/// A pipeline of every meta command in quiet mode over `n` keys (both
/// shards), base64 and plain, with `mn` at irregular points.
fn quiet_everything(n: usize) -> Vec<u8> {
    let mut p = Vec::new();
    for i in 0..n {
        let k = format!("mpl-{i}");
        let e = b64(k.as_bytes());
        let other = format!("mpl-{}", (i * 7 + 3) % n);
        p.extend(ms(&k, &format!("q F{i} T0"), format!("{i}").as_bytes()));
        p.extend(format!("mg {other} q v k f\r\nmg mpl-miss-{i} q v k O{i}\r\n").into_bytes());
        p.extend(format!("ma {k} q\r\nma {e} b q v\r\nma mpl-c{i} N0 J{i}\r\n").into_bytes());
        p.extend(ms(&k, "q MA", b"0"));
        p.extend(ms(&k, "q ME", b"dup"));
        p.extend(format!("md {k} q C1\r\nmg {e} b q k v f\r\n").into_bytes());
        if i % 3 == 0 {
            p.extend(format!("md {k} q\r\nmd {k} q\r\n").into_bytes());
        }
        if i % 4 == 1 {
            p.extend(b"mn\r\n");
        }
        if i % 5 == 2 {
            p.extend(format!("get {other}\r\nincr mpl-c{i} 1\r\n").into_bytes());
        }
    }
    p.extend(b"mn\r\n");
    p
}

spread_case!(meta_quiet_pipeline_everything, {
    let n = 24;
    let all: Vec<String> = (0..n)
        .flat_map(|i| [format!("mpl-{i}"), format!("mpl-c{i}")])
        .collect();
    vec![
        ex(quiet_everything(n)),
        ex(get_line("get", &all)),
        fresh(b"flush_all\r\n"),
        chunked(quiet_everything(n), 5),
        ex(get_line("get", &all)),
    ]
});

spread_case!(
    meta_malformed_get_delete_arith,
    vec![
        ex(b"mg  mpl-0 v\r\nmg mpl-0 v \r\nmg\tmpl-0\r\nMG mpl-0 v\r\nMg mpl-0\r\n"),
        ex(b"mg k O123456789012345678901234567890123\r\nmg k O\r\nmg k N\r\nmg k Nx\r\nmg k T\r\nmg k Tx\r\nmg k R\r\nmg k Rx\r\nmg k E5\r\nmg k C\r\n"),
        ex(b"mg k v k v\r\nmg k -\r\nmg k 5\r\nmg k \x01\r\nmg k vv\r\nmg k v\x00\r\n"),
        ex(b"md k x y z\r\nmd k Cx\r\nmd\r\nmd \r\nma k D\r\nma k N\r\nma k J\r\nma\r\nma  \r\n"),
        ex(b"mg k\x00x v\r\nmg k\x7fx v\r\nms k\x01 1\r\nx\r\nmg \xff\xfe v\r\n"),
        ex(format!("mg {} v\r\nmd {} q\r\nma {} q\r\nmn\r\n", "k".repeat(250), "k".repeat(251), "k".repeat(251))),
        ex(format!("mg mpl-1 {}\r\nmd mpl-1 {}\r\nma mpl-1 {}\r\n", vec!["k"; 30].join(" "), vec!["q"; 30].join(" "), vec!["v"; 30].join(" "))),
    ]
);

spread_case!(
    meta_malformed_set,
    vec![
        ex(b"ms k 1 T\r\nx\r\nms k 1 Tx\r\nx\r\nms k 1 F\r\nx\r\nms k 1 Fx\r\nx\r\nmg k v\r\n"),
        ex(b"ms k 1 C\r\nx\r\nms k 1 Cx\r\nx\r\nms k 1 M\r\nx\r\nms k 1 N\r\nx\r\nms k 1 O123456789012345678901234567890123\r\nx\r\nmg k v\r\n"),
        ex(b"ms k 1x\r\nx\r\n"),
        ex(b"ms k 99999999999999999999\r\nx\r\n"),
        ex(b"ms k -5\r\nx\r\n"),
        ex(b"ms k 2\r\nabc\r\nmg k v\r\n"),
        ex(b"ms k 2\r\na\r\nmg k v\r\n"),
        ex(b"ms k 0\r\n\r\nmg k v s\r\nms k 3 \r\nabc\r\nmg k v\r\n"),
        ex(b"ms  k 1\r\nx\r\nms k  1\r\nx\r\nMS k 1\r\nx\r\nmg k v\r\n"),
        ex(b"ms k 1 q q\r\nx\r\nms k 1 c c\r\nx\r\nms k 1 k O1 O2\r\nx\r\nmn\r\n"),
        ex(format!("ms {} 1\r\nx\r\nms {} 1 q\r\nx\r\nmn\r\n", "k".repeat(251), "k".repeat(250))),
        bytewise(b"ms msb-0 3 F2 k\r\nabc\r\nmg msb-0 v f k\r\nms msb-1 1 q\r\nz\r\nmn\r\n"),
    ]
);

#[test]
fn meta_case_keys_use_both_shards() {
    use memrelay::config::cli::{parse_args, Action};
    use memrelay::router::Router;
    let args = ["-s", "127.0.0.1:1", "-s", "127.0.0.1:2", "--hash", "magent"];
    let router = match parse_args(args.map(String::from).to_vec()) {
        Ok(Action::Run(cfg)) => Router::new(&cfg),
        other => panic!("bad args: {other:?}"),
    };
    let groups: Vec<(&str, Vec<Vec<u8>>)> = vec![
        (
            "mgf",
            keys("mgf-", 4)
                .into_iter()
                .map(String::into_bytes)
                .collect(),
        ),
        (
            "mgh",
            keys("mgh-", 4)
                .into_iter()
                .map(String::into_bytes)
                .collect(),
        ),
        (
            "mgq",
            keys("mgq-", 6)
                .into_iter()
                .map(String::into_bytes)
                .collect(),
        ),
        (
            "mgr",
            keys("mgr-", 4)
                .into_iter()
                .map(String::into_bytes)
                .collect(),
        ),
        (
            "mgn",
            keys("mgn-", 4)
                .into_iter()
                .map(String::into_bytes)
                .collect(),
        ),
        (
            "mgi",
            keys("mgi-", 4)
                .into_iter()
                .map(String::into_bytes)
                .collect(),
        ),
        (
            "msf",
            keys("msf-", 8)
                .into_iter()
                .map(String::into_bytes)
                .collect(),
        ),
        (
            "msc",
            keys("msc-", 4)
                .into_iter()
                .map(String::into_bytes)
                .collect(),
        ),
        (
            "msm",
            keys("msm-", 7)
                .into_iter()
                .map(String::into_bytes)
                .collect(),
        ),
        (
            "mdf",
            keys("mdf-", 6)
                .into_iter()
                .map(String::into_bytes)
                .collect(),
        ),
        (
            "maf",
            keys("maf-", 8)
                .into_iter()
                .map(String::into_bytes)
                .collect(),
        ),
        (
            "mpl",
            keys("mpl-", 24)
                .into_iter()
                .map(String::into_bytes)
                .collect(),
        ),
        (
            "mqa",
            keys("mqa-", 3)
                .into_iter()
                .map(String::into_bytes)
                .collect(),
        ),
        (
            "mnx",
            keys("mnx-", 2)
                .into_iter()
                .map(String::into_bytes)
                .collect(),
        ),
        (
            "mmf",
            keys("mmf-", 2)
                .into_iter()
                .map(String::into_bytes)
                .collect(),
        ),
        (
            "msb",
            keys("msb-", 2)
                .into_iter()
                .map(String::into_bytes)
                .collect(),
        ),
        ("binary", binary_keys()),
    ];
    for (name, ks) in groups {
        let shards: std::collections::BTreeSet<usize> =
            ks.iter().map(|k| router.primary(k)).collect();
        assert_eq!(
            shards.len(),
            2,
            "the {name} keys all map to shard {shards:?}"
        );
    }
}

#[test]
fn harness_masks_meta_cas_tokens() {
    let m = Memcached::start();
    let mut s = Side {
        addr: m.addr(),
        client: Client::with_sentinel(&m.addr()),
        cas: HashMap::new(),
    };
    let o = s.normalise(Reply {
        bytes: b"HD c12 kfoo\r\nVA 8 c7 kbar f1\r\nHD c9 kx\r\nEN\r\nHD cx c\r\nNS c1\r\n".to_vec(),
        end: End::Complete,
    });
    assert_eq!(
        o.bytes,
        b"HD c<cas> kfoo\r\nVA 8 c<cas> kbar f1\r\nHD c9 kx\r\nEN\r\nHD cx c\r\nNS c<cas>\r\n"
    );
    assert_eq!(s.cas.get(&b"foo"[..]).map(Vec::as_slice), Some(&b"12"[..]));
    assert_eq!(s.cas.get(&b"bar"[..]).map(Vec::as_slice), Some(&b"7"[..]));
    assert_eq!(s.substitute(b"ms foo 1 C$CAS(foo)"), b"ms foo 1 C12");
}

#[test]
fn harness_base64_encoder() {
    assert_eq!(b64(b""), "");
    assert_eq!(b64(b"f"), "Zg==");
    assert_eq!(b64(b"fo"), "Zm8=");
    assert_eq!(b64(b"foo"), "Zm9v");
    assert_eq!(b64(b"foob"), "Zm9vYg==");
    assert_eq!(b64(b"\x00\x01\xff"), "AAH/");
    assert_eq!(b64(b"x\r\ny"), "eA0KeQ==");
}

// ---------------------------------------------------------------------------
// Pipelining and split requests
// ---------------------------------------------------------------------------

fn mixed_pipeline() -> Vec<u8> {
    let mut p = Vec::new();
    for i in 0..30 {
        let k = format!("pipe-{i}");
        p.extend(set(&k, &i.to_string()));
        p.extend(format!("get {k} pipe-{}\r\n", (i + 7) % 30).into_bytes());
        p.extend(format!("incr {k} 100\r\n").into_bytes());
        if i % 3 == 0 {
            p.extend(format!("delete {k}\r\n").into_bytes());
        }
        if i % 5 == 0 {
            p.extend(store("append", &k, 0, 0, b"+a"));
            p.extend(b"bogus command\r\n");
            p.extend(format!("touch {k} 100\r\n").into_bytes());
        }
    }
    p.extend(get_line("get", &keys("pipe-", 30)));
    p
}

case!(
    pipeline_mixed_commands_one_write,
    vec![
        ex(mixed_pipeline()),
        ex(get_line("get", &keys("pipe-", 30)))
    ]
);

case!(pipeline_many_gets_one_write, {
    let ks = keys("pg-", 50);
    let mut p = Vec::new();
    for k in &ks {
        p.extend(format!("get {k}\r\ngets nokey-{k}\r\n").into_bytes());
    }
    vec![ex(set_all(&ks)), ex(p)]
});

case!(pipeline_more_than_1024_requests_one_write, {
    // Deeper than any plausible fixed in-flight window of the proxy.
    let ks = keys("deep-", 1500);
    let mut gets = Vec::new();
    for k in &ks {
        gets.extend(format!("get {k}\r\n").bytes());
    }
    vec![ex(set_all(&ks)), ex(gets)]
});

case!(pipeline_noreply_flood_then_get, {
    let mut req = Vec::new();
    for i in 0..3000 {
        req.extend(format!("set flood-{i} 0 0 1 noreply\r\nx\r\n").bytes());
    }
    req.extend(b"get flood-0 flood-1500 flood-2999\r\n");
    vec![ex(req)]
});

case!(
    pipeline_split_in_small_chunks,
    vec![chunked(mixed_pipeline(), 7)]
);

case!(split_byte_by_byte_set_get, {
    vec![
        bytewise(b"set bb1 3 0 5\r\nhe\r\nl\r\nget bb1 nokey\r\n"),
        bytewise(b"gets bb1\r\n"),
    ]
});

case!(split_byte_by_byte_misc, {
    vec![
        bytewise(b"incr nokey 1\r\n"),
        bytewise(b"set bb2 0 0 2\r\n10\r\nincr bb2 5\r\ndelete bb2\r\n"),
        bytewise(b"get a b c\r\n"),
        bytewise(b"bogus\r\n"),
    ]
});

case!(split_between_cr_and_lf, {
    vec![
        split(&[&b"set sc1 0 0 2\r"[..], b"\nab\r", b"\n"]),
        split(&[&b"get sc1\r"[..], b"\n"]),
        split(&[&b"get sc1"[..], b"\r\n"]),
    ]
});

case!(split_large_get_line, {
    let ks = keys("slg-", 600);
    vec![ex(set_all(&ks[..300])), chunked(get_line("get", &ks), 100)]
});

case!(split_long_get_line_then_newline, {
    // A get line longer than memcached's 2048-byte line buffer, whose
    // newline arrives later: the (too long) key must be rejected.
    let mut first = b"get ".to_vec();
    first.extend(vec![b'y'; 3000]);
    vec![split(&[first, b"\r\n".to_vec()]), ex(b"get y\r\n")]
});

// ---------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------

case!(
    unknown_command,
    vec![ex(b"foo bar\r\n"), ex(b"foo\r\n"), ex(b"gett k\r\n")]
);

case!(empty_line, vec![ex(b"\r\n"), ex(b"\n"), ex(b" \r\n")]);

case!(upper_case_commands, {
    vec![
        ex(set("up", "v")),
        ex(b"GET up\r\n"),
        ex(b"Get up\r\n"),
        ex(b"SET up 0 0 1\r\nx\r\n"),
        ex(b"DELETE up\r\n"),
        ex(b"get up\r\n"),
    ]
});

case!(set_bad_numbers, {
    vec![
        ex(b"set bn 0 0 abc\r\nabc\r\n"),
        ex(b"set bn x 0 3\r\nabc\r\n"),
        ex(b"set bn 0 x 3\r\nabc\r\n"),
        ex(b"set bn -1 0 3\r\nabc\r\n"),
        ex(b"set bn 0 0 3x\r\nabc\r\n"),
        ex(b"get bn\r\n"),
    ]
});

case!(
    set_negative_length,
    vec![ex(b"set neglen 0 0 -1\r\n"), ex(b"get neglen\r\n")]
);

case!(
    set_too_few_tokens,
    vec![
        ex(b"set tf 0 0\r\nabc\r\n"),
        ex(b"set tf\r\n"),
        ex(b"set\r\n")
    ]
);

case!(too_many_tokens, {
    vec![
        ex(set("tm", "1")),
        ex(b"set tm 0 0 1 noreply extra\r\nx\r\n"),
        ex(b"incr tm 1 noreply extra\r\n"),
        ex(b"incr tm 1 extra\r\n"),
        ex(b"touch tm 10 noreply extra\r\n"),
        ex(b"delete tm noreply extra\r\n"),
        ex(b"get tm\r\n"),
    ]
});

case!(get_with_many_tokens, {
    // More keys than memcached's internal token limit (24) on one line.
    let ks = keys("t", 40);
    vec![ex(set_all(&ks[..5])), ex(get_line("get", &ks))]
});

case!(data_block_too_long, {
    vec![
        ex(set("dl", "old")),
        ex(b"set dl 0 0 3\r\nabcd\r\nget dl\r\n"),
        ex(b"get dl\r\n"),
    ]
});

case!(data_block_too_short, {
    vec![
        ex(set("ds", "old")),
        ex(b"set ds 0 0 5\r\nabc\r\nget ds\r\n"),
        ex(b"get ds\r\n"),
    ]
});

case!(data_block_bad_terminator, {
    vec![ex(b"set dt 0 0 3\r\nabcXYget dt\r\n"), ex(b"get dt\r\n")]
});

case!(key_of_250_bytes_works, {
    let k = "k".repeat(250);
    vec![
        ex(set(&k, "v")),
        ex(format!("get {k}\r\n")),
        ex(format!("delete {k}\r\n")),
    ]
});

case!(key_of_251_bytes_rejected, {
    let k = "k".repeat(251);
    vec![
        ex(set(&k, "v")),
        ex(format!("get {k}\r\n")),
        ex(format!("get ok {k}\r\n")),
        ex(format!("delete {k}\r\n")),
        ex(format!("incr {k} 1\r\n")),
        ex(format!("touch {k} 1\r\n")),
        ex(b"get ok\r\n"),
    ]
});

case!(value_too_large, {
    let big = vec![b'z'; 1024 * 1024 + 1];
    vec![
        ex(set("tl", "small")),
        ex(store("set", "tl", 0, 0, &big)),
        ex(b"get tl\r\n"),
        ex(store("set", "tl2", 0, 0, &vec![b'z'; 2_000_000])),
        ex(set("tl3", "after")),
        ex(b"get tl2 tl3\r\n"),
    ]
});

case!(long_line_without_newline_closes, {
    vec![ex(b"get x\r\n"), until_close(vec![b'x'; 4096])]
});

case!(lf_only_line_endings, {
    vec![
        ex(b"set lf 0 0 3\nabc\r\nget lf\n"),
        ex(b"incr lf 1\n"),
        ex(b"delete lf\nget lf\n"),
        ex(b"set lf2 0 0 3\r\nabc\nget lf2\r\n"),
    ]
});

case!(nul_bytes, {
    vec![
        ex(set("nul", "v")),
        ex(b"get nul\0zzz\r\n"),
        ex(b"ge\0t nul\r\n"),
        ex(b"\0\r\n"),
        ex(store("set", "nulv", 0, 0, b"\0\0\0")),
        ex(b"get nulv\r\n"),
    ]
});

case!(tab_and_control_characters, {
    vec![
        ex(set("tab", "v")),
        ex(b"get\ttab\r\n"),
        ex(b"get tab\t\r\n"),
        ex(b"get \x01\r\n"),
    ]
});

// Small extension used above: replace the first occurrence of a pattern.
trait ReplaceFirst {
    fn replace_first(self, from: &[u8], to: &[u8]) -> Vec<u8>;
}

impl ReplaceFirst for Vec<u8> {
    fn replace_first(self, from: &[u8], to: &[u8]) -> Vec<u8> {
        match self.windows(from.len()).position(|w| w == from) {
            Some(i) => [&self[..i], to, &self[i + from.len()..]].concat(),
            None => panic!("case bug: {} not found", escape(from)),
        }
    }
}

// ---------------------------------------------------------------------------
// Concurrency (not differential): clients on the target do not see each
// other's replies, and all of their writes land.
// ---------------------------------------------------------------------------

#[test]
fn concurrent_clients_get_their_own_replies() {
    let target = Target::start(&[]);
    let addr = target.addr();
    std::thread::scope(|scope| {
        for t in 0..8 {
            let addr = addr.clone();
            scope.spawn(move || {
                let mut c = Client::with_sentinel(&addr);
                for round in 0..25 {
                    let ks = keys(&format!("cc-{t}-{round}-"), 8);
                    let mut req = set_all(&ks);
                    req.extend(get_line("get", &ks));
                    let mut want = b"STORED\r\n".repeat(ks.len());
                    for k in &ks {
                        want.extend(
                            format!("VALUE {k} 0 {}\r\nv-{k}\r\nEND\r\n", k.len() + 2).bytes(),
                        );
                    }
                    // One END for the whole get, not one per key.
                    let want = String::from_utf8(want)
                        .unwrap()
                        .replace("\r\nEND\r\nVALUE", "\r\nVALUE");
                    let r = c.exchange(&req);
                    assert_eq!(r.end, End::Complete, "client {t} round {round}");
                    assert_eq!(
                        escape(&r.bytes),
                        escape(want.as_bytes()),
                        "client {t} round {round}"
                    );
                }
            });
        }
    });
}

// ---------------------------------------------------------------------------
// Harness self-tests: the comparison must be able to fail, and cas masking
// must hide only the cas values.
// ---------------------------------------------------------------------------

fn observe(addr: &str, steps: &[Step]) -> Vec<Obs> {
    let mut side = Side::new(addr.to_string());
    steps.iter().map(|s| side.run(s)).collect()
}

#[test]
fn harness_detects_a_differing_reply() {
    let a = Memcached::start();
    let b = Memcached::start();
    let mut c = Client::with_sentinel(&b.addr());
    assert_eq!(c.exchange(&set("only-on-b", "x")).bytes, b"STORED\r\n");
    let steps = vec![ex(b"get only-on-b\r\n")];
    let (oa, ob) = (observe(&a.addr(), &steps), observe(&b.addr(), &steps));
    assert_eq!(oa[0].bytes, b"END\r\n");
    assert_eq!(ob[0].bytes, b"VALUE only-on-b 0 1\r\nx\r\nEND\r\n");
    assert!(oa != ob);
}

#[test]
fn harness_masks_only_cas_values() {
    let a = Memcached::start();
    let b = Memcached::start();
    // Advance b's cas counter so that the ids differ.
    let mut c = Client::with_sentinel(&b.addr());
    for i in 0..5 {
        assert_eq!(
            c.exchange(&set("bump", &i.to_string())).bytes,
            b"STORED\r\n"
        );
    }
    let steps = [
        ex(set("cm", "v")),
        ex(b"gets cm\r\n"),
        ex(b"cas cm 0 0 1 $CAS(cm)\r\nw\r\n"),
        ex(b"gets cm\r\n"),
    ];
    let mut sa = Side::new(a.addr());
    let mut sb = Side::new(b.addr());
    let oa: Vec<Obs> = steps.iter().map(|s| sa.run(s)).collect();
    let ob: Vec<Obs> = steps.iter().map(|s| sb.run(s)).collect();
    assert_ne!(
        sa.cas.get(&b"cm"[..]),
        sb.cas.get(&b"cm"[..]),
        "cas ids should differ"
    );
    assert_eq!(oa[1].bytes, b"VALUE cm 0 1 <cas>\r\nv\r\nEND\r\n");
    assert_eq!(oa[2].bytes, b"STORED\r\n", "per-side $CAS substitution");
    assert!(oa == ob, "masked transcripts should be equal");
    // A non-numeric cas field is not masked.
    let o = sa.normalise(Reply {
        bytes: b"VALUE k 0 1 x1\r\nv\r\nEND\r\n".to_vec(),
        end: End::Complete,
    });
    assert_eq!(o.bytes, b"VALUE k 0 1 x1\r\nv\r\nEND\r\n");
    // Data blocks are skipped by length, never parsed as lines.
    let o = sa.normalise(Reply {
        bytes: b"VALUE k 0 15\r\nVALUE a 0 1 9\r\n\r\nEND\r\n".to_vec(),
        end: End::Complete,
    });
    assert_eq!(o.bytes, b"VALUE k 0 15\r\nVALUE a 0 1 9\r\n\r\nEND\r\n");
}

#[test]
fn harness_framing_checks_reject_garbage() {
    assert!(stats_framing_ok(b"STAT pid 1\r\nSTAT x y z\r\nEND\r\n"));
    assert!(!stats_framing_ok(b"END\r\n"));
    assert!(!stats_framing_ok(b"STAT pid\r\nEND\r\n"));
    assert!(!stats_framing_ok(b"STAT pid 1\r\nERROR\r\nEND\r\n"));
    assert!(!stats_framing_ok(b"STAT pid 1\r\n"));
}
