//! memrelay-chaos: drives concurrent load through memrelay while memcached
//! servers are killed, restarted (same port, empty), stopped (SIGSTOP) and
//! resumed at random, checks every reply against a model of each key, and
//! prints the counts. Exit status: 0 no violation, 1 violations, 2 the run
//! could not be set up (or a process misbehaved outside the checks).
//!
//! The rules checked are in model.rs and docs/chaos.md.

mod chaos;
mod fleet;
mod reloads;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chaos::{ChaosCfg, ChaosTally, Watch};
use memrelay_testkit::conn::{Conn, Reply};
use memrelay_testkit::model::{self, Ctx, Item, KeyModel, Op, Tally};
use memrelay_testkit::process::{kill_all_children, try_free_port, wait_until};
use memrelay_testkit::{Memcached, Memrelay, MemrelayCmd, Rng};

const USAGE: &str = "\
usage: memrelay-chaos [options] [-- extra memrelay args]

Starts N memcached primaries and one backup on 127.0.0.1, memrelay in front
of them, then runs client threads (each owning its keys; set, add,
replace, cas, get, gets, gat, gats, multi-get, delete, incr, decr, append,
prepend, touch, TTLs of a few seconds, and the meta forms ms, mg, mg T,
md, ma, and ma N J (autovivify);
every third client pipelines, a key may come twice in one pipeline) for the
duration while a chaos thread kills, restarts (same port, empty), SIGSTOPs
and SIGCONTs servers. Every reply is checked against a model: no stale
value, nothing acknowledged lost while a replica holding it stayed up, no
wrong reply, no answer later than the bound. Prints the counts; exits 1 on
any violation, 2 if the run could not be set up.

options:
  --duration D       how long the chaos lasts (default 15s; 90 = 90s, 5m)
  --clients N        client threads (default 8)
  --keys N           keys per client (default 16; every 4th a counter)
  --primaries N      memcached primaries (default 2)
  --seed N           seed for every random choice (default: from the clock)
  --timeout D        memrelay --timeout (default 500ms)
  --slack D          latency bound = 2 x timeout + 300ms connect + slack
                     (default 1s)
  --settle D         how long after an event a server counts as disturbed
                     for the loss check (default 5s)
  --chaos-backup     also kill/stop the backup (only while every primary
                     is up, unless --overlap)
  --overlap          allow a key's primary and backup out at the same time
  --no-pipeline      no client pipelines
  --relay-chaos      also restart memrelay itself every 3..8 s, on the same
                     port with --state-file and --handoff: a planned
                     restart (SIGTERM), a crash (SIGKILL) or a hand-off
                     (a second memrelay takes the sockets over). After a
                     crash every server counts as disturbed (the new
                     process flushes those it had marked dirty)
  --relay-acts LIST  which restarts --relay-chaos makes, of term,kill,handoff
                     (default all three), and stop: SIGSTOP for 250..750 ms
                     (in a fleet, a member the others cannot tell: run it
                     with -- --peer-confirm all, since by default such a
                     member may serve older values once it runs again)
  --fleet N          N memrelays (2..5) that are peers (--peer), each reaching
                     every server through its own forwarder (a fake link);
                     clients send each batch through a random member, and
                     --relay-chaos restarts one member at a time
  --partitions       with --fleet: also cut (blackhole), reset or slow one
                     member's link to one server at a time, for 0.3..3 s:
                     partial partitions
  --peer-cuts        with --partitions: the members reach each other through
                     links of their own too (each member's --peer list
                     names its links), and a quarter of the faults cut,
                     reset or slow a link between two members (run it with
                     -- --peer-confirm all: by default a member cut from
                     another may serve older values, docs/ha.md)
  --reloads          also rolling reloads: a spare memcached is added to the
                     primaries and removed again, every 4..9 s, each time
                     in every member's file, reloaded (SIGHUP) one member
                     after another 0..1.5 s apart (the members read their
                     servers from a file)
  --storm            also a thread of clients that pipeline 500 sets of
                     their own keys and reset the connection 2 ms later,
                     and 200 idle connections held open to /metrics (the
                     memrelay gets --metrics): neither may cost the backup
                     its copies or a modelled request its answer
  --strict-writes    an incr/append answering NOT_FOUND/NOT_STORED while a
                     replica untouched since the value's set held it counts
                     as lost (docs/ha.md allows it; see docs/chaos.md)
  --pause A..B       pause between chaos actions in ms (default 150..600)
  --memrelay PATH    memrelay binary (default: next to this binary, else the
                     newest of target/{release,debug}/memrelay)
  --memcached PATH   memcached binary (default: memcached on PATH)
  --relay-log FILE   write all of memrelay's log to FILE, each line
                     prefixed with the run's clock (ms, as in the chaos and
                     key histories) and the member (m0, m1...); set
                     MEMRELAY_LOG=memrelay=debug for detail
  -v, --verbose      print the chaos log
  -h, --help         this text
";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

#[derive(Debug, Clone)]
struct Cfg {
    duration: Duration,
    clients: usize,
    keys: usize,
    primaries: usize,
    seed: u64,
    timeout: Duration,
    timeout_arg: String,
    slack: Duration,
    settle: Duration,
    chaos_backup: bool,
    overlap: bool,
    pipeline: bool,
    strict_writes: bool,
    pause_ms: (u64, u64),
    memrelay: Option<String>,
    memcached: String,
    relay_log: Option<PathBuf>,
    verbose: bool,
    /// Also restart memrelay itself: SIGTERM, SIGKILL, or a hand-off.
    relay_chaos: bool,
    /// Which of those (`--relay-acts`).
    relay_acts: Vec<RelayAct>,
    /// Also clients that leave with writes in flight, and idle scrapers
    /// holding connections to /metrics.
    storm: bool,
    /// Memrelays in the fleet (1: a single memrelay, no peers).
    fleet: usize,
    /// Fault the fleet's links at random.
    partitions: bool,
    /// Rolling reloads that add and remove a spare primary.
    reloads: bool,
    /// Members reach each other through links of their own, which the
    /// partitions cut too.
    peer_cuts: bool,
    extra: Vec<String>,
}

/// "250ms", "2s", "1.5s", "5m"; a bare number is in `unit`.
fn parse_duration(s: &str, unit: Duration) -> Result<Duration, String> {
    let bad = || format!("bad duration {s:?}");
    let (num, mul) = if let Some(n) = s.strip_suffix("ms") {
        (n, Duration::from_millis(1))
    } else if let Some(n) = s.strip_suffix('s') {
        (n, Duration::from_secs(1))
    } else if let Some(n) = s.strip_suffix('m') {
        (n, Duration::from_secs(60))
    } else {
        (s, unit)
    };
    let v: f64 = num.parse().map_err(|_| bad())?;
    if !(0.0..1e7).contains(&v) {
        return Err(bad());
    }
    Ok(mul.mul_f64(v))
}

fn parse_args(args: &[String]) -> Result<Option<Cfg>, String> {
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        ^ u64::from(std::process::id());
    let mut c = Cfg {
        duration: Duration::from_secs(15),
        clients: 8,
        keys: 16,
        primaries: 2,
        seed: seed % 1_000_000_000,
        timeout: Duration::from_millis(500),
        timeout_arg: "500ms".into(),
        slack: Duration::from_secs(1),
        settle: Duration::from_secs(5),
        chaos_backup: false,
        overlap: false,
        pipeline: true,
        strict_writes: false,
        pause_ms: (150, 600),
        memrelay: None,
        memcached: "memcached".into(),
        relay_log: None,
        verbose: false,
        relay_chaos: false,
        relay_acts: vec![RelayAct::Terminate, RelayAct::Kill, RelayAct::Handoff],
        storm: false,
        fleet: 1,
        partitions: false,
        reloads: false,
        peer_cuts: false,
        extra: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value"))
        };
        let num = |v: String| -> Result<u64, String> {
            v.parse().map_err(|_| format!("{a}: bad number {v:?}"))
        };
        match a.as_str() {
            "-h" | "--help" => return Ok(None),
            "--duration" => c.duration = parse_duration(&val()?, Duration::from_secs(1))?,
            "--clients" => c.clients = num(val()?)?.clamp(1, 512) as usize,
            "--keys" => c.keys = num(val()?)?.clamp(1, 10_000) as usize,
            "--primaries" => c.primaries = num(val()?)?.clamp(1, 16) as usize,
            "--seed" => c.seed = num(val()?)?,
            "--timeout" => {
                let v = val()?;
                c.timeout = parse_duration(&v, Duration::from_millis(1))?;
                c.timeout_arg = v;
            }
            "--slack" => c.slack = parse_duration(&val()?, Duration::from_millis(1))?,
            "--settle" => c.settle = parse_duration(&val()?, Duration::from_millis(1))?,
            "--chaos-backup" => c.chaos_backup = true,
            "--overlap" => c.overlap = true,
            "--no-pipeline" => c.pipeline = false,
            "--strict-writes" => c.strict_writes = true,
            "--relay-chaos" => c.relay_chaos = true,
            "--relay-acts" => {
                c.relay_acts = val()?
                    .split(',')
                    .map(|a| match a {
                        "term" => Ok(RelayAct::Terminate),
                        "kill" => Ok(RelayAct::Kill),
                        "handoff" => Ok(RelayAct::Handoff),
                        "stop" => Ok(RelayAct::Stop),
                        other => Err(format!(
                            "--relay-acts: unknown {other:?} (term, kill, handoff, stop)"
                        )),
                    })
                    .collect::<Result<_, _>>()?;
                if c.relay_acts.is_empty() {
                    return Err("--relay-acts: name at least one".into());
                }
            }
            "--storm" => c.storm = true,
            "--fleet" => c.fleet = num(val()?)?.clamp(2, 5) as usize,
            "--partitions" => c.partitions = true,
            "--reloads" => c.reloads = true,
            "--peer-cuts" => c.peer_cuts = true,
            "--pause" => {
                let v = val()?;
                let (a, b) = v
                    .split_once("..")
                    .ok_or_else(|| format!("--pause: expected A..B, got {v:?}"))?;
                let (a, b) = (num(a.into())?, num(b.into())?);
                if a > b || b == 0 {
                    return Err(format!("--pause: bad range {v:?}"));
                }
                c.pause_ms = (a, b);
            }
            "--memrelay" => c.memrelay = Some(val()?),
            "--memcached" => c.memcached = val()?,
            "--relay-log" => c.relay_log = Some(PathBuf::from(val()?)),
            "-v" | "--verbose" => c.verbose = true,
            "--" => {
                c.extra = it.by_ref().cloned().collect();
            }
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    if c.partitions && c.fleet < 2 {
        return Err("--partitions needs --fleet N".into());
    }
    if c.peer_cuts && !c.partitions {
        return Err("--peer-cuts needs --fleet N --partitions".into());
    }
    Ok(Some(c))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match parse_args(&args) {
        Ok(Some(c)) => c,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("memrelay-chaos: {e}");
            return ExitCode::from(2);
        }
    };
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        kill_all_children();
        prev(info);
    }));
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    let handler: extern "C" fn(libc::c_int) = on_signal;
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
    let code = match run(&cfg) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("memrelay-chaos: {e}");
            ExitCode::from(2)
        }
    };
    kill_all_children();
    code
}

/// A `stats` of `addr` as a map (empty on failure).
fn stats(addr: &str) -> HashMap<String, String> {
    let Ok(mut c) = Conn::connect(addr) else {
        return HashMap::new();
    };
    c.stats(Instant::now() + Duration::from_secs(5))
        .map(|v| v.into_iter().collect())
        .unwrap_or_default()
}

/// Whether memrelay at `addr` lists at least `n` servers, each up (with
/// `--reloads` the list has the spare, or had it).
fn all_up(addr: &str, n: usize) -> bool {
    let s = stats(addr);
    let states: Vec<&String> = s
        .iter()
        .filter(|(k, _)| k.starts_with("server:") && k.ends_with(":state"))
        .map(|(_, v)| v)
        .collect();
    states.len() >= n && states.iter().all(|v| *v == "up")
}

/// Stores every key through the proxy, then asks each primary directly
/// which keys it holds: the key's primary as memrelay routes it (learned,
/// so the tool does not depend on the hash). Deletes them again.
fn learn_routing(
    relay: &str,
    primaries: &[Memcached],
    names: &[String],
) -> Result<Vec<usize>, String> {
    let dl = || Instant::now() + Duration::from_secs(10);
    let mut px = Conn::connect(relay)?;
    for chunk in names.chunks(100) {
        let mut req = String::new();
        for k in chunk {
            req.push_str(&format!("set {k} 0 0 5\r\nprobe\r\n"));
        }
        px.send(req.as_bytes()).map_err(|e| e.to_string())?;
        for k in chunk {
            let l = px.line(dl()).map_err(|e| format!("setup set {k}: {e}"))?;
            if l != "STORED" {
                return Err(format!("setup: set {k} through memrelay answered {l:?}"));
            }
        }
    }
    let mut owner: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, p) in primaries.iter().enumerate() {
        let mut c = Conn::connect(&p.addr())?;
        for chunk in names.chunks(50) {
            c.send(format!("get {}\r\n", chunk.join(" ")).as_bytes())
                .map_err(|e| e.to_string())?;
            match c.retrieval(dl()) {
                Ok(Reply::Values(vals)) => {
                    for v in vals {
                        if let Some(k) = chunk.iter().find(|k| **k == v.key) {
                            owner.entry(k.as_str()).or_default().push(i);
                        }
                    }
                }
                other => return Err(format!("setup: get on primary {i}: {other:?}")),
            }
        }
    }
    let mut out = Vec::new();
    for k in names {
        match owner.get(k.as_str()).map(Vec::as_slice) {
            Some([p]) => out.push(*p),
            other => {
                return Err(format!(
                    "setup: {k} stored through memrelay is on primaries {other:?}, expected exactly one"
                ))
            }
        }
    }
    for chunk in names.chunks(100) {
        let mut req = String::new();
        for k in chunk {
            req.push_str(&format!("delete {k}\r\n"));
        }
        px.send(req.as_bytes()).map_err(|e| e.to_string())?;
        for k in chunk {
            let l = px
                .line(dl())
                .map_err(|e| format!("setup delete {k}: {e}"))?;
            if l != "DELETED" {
                return Err(format!("setup: delete {k} answered {l:?}"));
            }
        }
    }
    Ok(out)
}

/// What one client thread ends with.
struct ClientEnd {
    tally: Tally,
    keys: Vec<KeyModel>,
    error: Option<String>,
}

/// Keys per client that carry short TTLs (see `KeyModel::ttl_key`).
const TTL_KEYS: usize = 4;

/// Picks a batch: 1 op, or 2..=6 for a pipelining client. A quarter of a
/// pipelined batch's single-key requests reuse a key already in the batch
/// (the model checks replies in order, so each sees the ones before it):
/// the proxy must apply them in order on every replica.
fn pick_batch(rng: &mut Rng, keys: &[KeyModel], size: usize, seq: &mut u64) -> Vec<Op> {
    let mut used = vec![false; keys.len()];
    let mut in_batch: Vec<usize> = Vec::new();
    let mut ops = Vec::new();
    let free = |used: &[bool], rng: &mut Rng| -> Option<usize> {
        for _ in 0..8 {
            let k = rng.below(keys.len() as u64) as usize;
            // TTL keys are picked rarely, so that they are often left
            // alone past their expiry.
            if !used[k] && (!keys[k].ttl_key || rng.below(100) < 3) {
                return Some(k);
            }
        }
        None
    };
    while ops.len() < size {
        let again = !in_batch.is_empty() && rng.below(100) < 25;
        let k = if again {
            in_batch[rng.below(in_batch.len() as u64) as usize]
        } else {
            let Some(k) = free(&used, rng) else { break };
            k
        };
        used[k] = true;
        in_batch.push(k);
        if !again && rng.below(100) < 12 && keys.len() > 1 {
            let mut ks = vec![k];
            let want = 2 + rng.below(4) as usize;
            while ks.len() < want {
                match free(&used, rng) {
                    Some(k2) => {
                        used[k2] = true;
                        ks.push(k2);
                    }
                    None => break,
                }
            }
            ops.push(Op::Get { ks });
            continue;
        }
        let m = &keys[k];
        let r = rng.below(100);
        *seq += 1;
        let s = *seq;
        let flags = (s % 1000) as u32 + 1;
        let op = if m.ttl_key {
            let item = Item {
                data: format!("{}s{s}", m.tag),
                flags,
            };
            match r {
                0..=2 => Op::SetTtl {
                    k,
                    item,
                    ttl: 1 + rng.below(2) as u32,
                },
                3..=5 => Op::Gat {
                    ks: vec![k],
                    ttl: 1 + rng.below(2) as u32,
                    cas: rng.below(2) == 0,
                },
                6 => Op::Set { k, item },
                7 => Op::Gat {
                    ks: vec![k],
                    ttl: 0,
                    cas: rng.below(2) == 0,
                },
                _ => Op::Get { ks: vec![k] },
            }
        } else if m.counter {
            match r {
                0..=24 => Op::Set {
                    k,
                    item: Item {
                        data: (s * 1_000_000).to_string(),
                        flags,
                    },
                },
                25..=54 => Op::Incr {
                    k,
                    delta: 1 + rng.below(9),
                    // A third go down (the counters start at millions).
                    down: rng.below(3) == 0,
                },
                55..=61 => Op::Delete { k },
                _ => Op::Get { ks: vec![k] },
            }
        } else {
            match r {
                0..=21 => Op::Set {
                    k,
                    item: Item {
                        data: format!("{}s{s}", m.tag),
                        flags,
                    },
                },
                22..=24 => Op::Replace {
                    k,
                    item: Item {
                        data: format!("{}r{s}", m.tag),
                        flags,
                    },
                },
                25..=27 => Op::SetTtl {
                    k,
                    item: Item {
                        data: format!("{}s{s}", m.tag),
                        flags,
                    },
                    ttl: 1 + rng.below(3) as u32,
                },
                28..=32 => Op::Add {
                    k,
                    item: Item {
                        data: format!("{}d{s}", m.tag),
                        flags,
                    },
                },
                33..=40 => Op::Append {
                    k,
                    suffix: format!(".a{s}"),
                    front: rng.below(4) == 0,
                },
                41..=48 => Op::Delete { k },
                49..=52 => Op::Gets { k },
                53..=56 => match m.gets_unique {
                    Some((unique, _)) => Op::Cas {
                        k,
                        item: Item {
                            data: format!("{}c{s}", m.tag),
                            flags,
                        },
                        unique,
                    },
                    None => Op::Gets { k },
                },
                57..=59 => Op::Touch { k },
                60..=62 => Op::Gat {
                    ks: vec![k],
                    // Never expires, or expires a few seconds from now.
                    ttl: [0, 0, 2, 4][rng.below(4) as usize],
                    cas: rng.below(2) == 0,
                },
                _ => Op::Get { ks: vec![k] },
            }
        };
        // A fifth of what has a meta form goes in it.
        let op = if rng.below(100) < 20 {
            meta_form(op)
        } else {
            op
        };
        ops.push(op);
    }
    ops
}

/// The meta twin of a request, where it has one.
fn meta_form(op: Op) -> Op {
    match op {
        Op::Set { k, item } => Op::MetaSet { k, item },
        Op::Get { ks } if ks.len() == 1 => Op::MetaGet {
            k: ks[0],
            ttl: None,
        },
        Op::Gat {
            ks,
            ttl,
            cas: false,
        } if ks.len() == 1 => Op::MetaGet {
            k: ks[0],
            ttl: Some(ttl),
        },
        Op::Delete { k } => Op::MetaDelete { k },
        Op::Incr {
            k,
            delta,
            down: false,
        } => Op::MetaIncr {
            k,
            delta,
            // Every third autovivifies (`N0 J<init>`): an acknowledged
            // counter must never be reset to the initial value.
            init: (delta % 3 == 0).then_some(7_000_000 + delta),
        },
        other => other,
    }
}

fn client(
    t: usize,
    cfg: &Cfg,
    relays: &[String],
    mut keys: Vec<KeyModel>,
    watch: &Watch,
    stop: &AtomicBool,
) -> ClientEnd {
    let mut rng = Rng::new(cfg.seed ^ (0x5bd1_e995_u64.wrapping_mul(t as u64 + 1)));
    let mut tally = Tally::new();
    let pipelining = cfg.pipeline && t % 3 == 2;
    let live = |p: usize, since: Instant| watch.live_replica(p, since);
    // In a fleet, each violation names the member that answered.
    let phases: Vec<String> = match relays.len() {
        1 => vec!["during chaos".to_string()],
        n => (0..n)
            .map(|m| format!("during chaos via memrelay {m}"))
            .collect(),
    };
    let ctx_via = |m: usize| Ctx {
        start: watch.start,
        client: t,
        phase: &phases[m],
        bound: bound(cfg),
        live_replica: &live,
        strict_writes: cfg.strict_writes,
        in_flight: in_flight(cfg),
    };
    let client_deadline = bound(cfg) + Duration::from_secs(5);
    // Two connections per memrelay: consecutive batches of one client go
    // through different members of a fleet.
    let mut conns: Vec<Option<Conn>> = (0..2 * relays.len()).map(|_| None).collect();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let size = if pipelining {
            2 + rng.below(5) as usize
        } else {
            1
        };
        let ops = pick_batch(&mut rng, &keys, size, &mut seq);
        let ci = rng.below(conns.len() as u64) as usize;
        if conns[ci].is_none() {
            match connect_retrying(&relays[ci % relays.len()], stop) {
                Ok(c) => conns[ci] = Some(c),
                Err(e) => {
                    return ClientEnd {
                        tally,
                        keys,
                        error: Some(format!("client {t}: cannot connect to memrelay: {e}")),
                    }
                }
            }
        }
        let Some(conn) = conns[ci].as_mut() else {
            continue;
        };
        tally.batches += 1;
        if ops.len() > 1 {
            tally.pipelined_batches += 1;
            let mut seen: Vec<usize> = ops.iter().flat_map(Op::keys).collect();
            let n = seen.len();
            seen.sort_unstable();
            seen.dedup();
            if seen.len() < n {
                tally.repeated_key_batches += 1;
            }
        }
        let ctx = ctx_via(ci % relays.len());
        let ok = model::exchange(conn, &ctx, &mut tally, &mut keys, &ops, client_deadline);
        if !ok {
            conns[ci] = None;
        }
    }
    ClientEnd {
        tally,
        keys,
        error: None,
    }
}

/// Connects to memrelay, retrying for a while: with --relay-chaos it is
/// being restarted now and then (a few hundred ms without a listener).
fn connect_retrying(relay: &str, stop: &AtomicBool) -> Result<Conn, String> {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        match Conn::connect(relay) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= end || stop.load(Ordering::Relaxed) => return Err(e),
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// How long a write of unknown outcome may still land (`Ctx::in_flight`):
/// the longest delay `--partitions` puts on a link, if it does.
fn in_flight(cfg: &Cfg) -> Duration {
    if cfg.partitions {
        fleet::longest_delay(cfg.timeout)
    } else {
        Duration::ZERO
    }
}

fn bound(cfg: &Cfg) -> Duration {
    cfg.timeout * 2 + Duration::from_millis(300) + cfg.slack
}

/// Reads every key of one client once, through a fresh connection.
fn final_reads(cfg: &Cfg, relay: &str, watch: &Watch, t: usize, end: &mut ClientEnd, phase: &str) {
    let live = |p: usize, since: Instant| watch.live_replica(p, since);
    let ctx = Ctx {
        start: watch.start,
        client: t,
        phase,
        bound: bound(cfg),
        live_replica: &live,
        strict_writes: cfg.strict_writes,
        in_flight: in_flight(cfg),
    };
    let mut conn: Option<Conn> = None;
    for k in 0..end.keys.len() {
        if conn.is_none() {
            match Conn::connect(relay) {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    end.error.get_or_insert(format!("{phase}: {e}"));
                    return;
                }
            }
        }
        let Some(c) = conn.as_mut() else { return };
        let op = Op::Get { ks: vec![k] };
        let deadline = ctx.bound + Duration::from_secs(5);
        let ok = model::exchange(
            c,
            &ctx,
            &mut end.tally,
            &mut end.keys,
            std::slice::from_ref(&op),
            deadline,
        );
        if !ok {
            conn = None;
        }
    }
}

/// --storm: clients that pipeline sets of their own keys (not modelled)
/// and leave with them in flight, a reset 2 ms after the write.
fn disconnect_storm(relay: &str, stop: &AtomicBool) {
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut c) = std::net::TcpStream::connect(relay) else {
            thread::sleep(Duration::from_millis(20));
            continue;
        };
        let mut req = Vec::with_capacity(500 * 40);
        for i in 0..500 {
            req.extend_from_slice(format!("set storm:{round}:{i} 0 0 1\r\nx\r\n").as_bytes());
        }
        let _ = std::io::Write::write_all(&mut c, &req);
        thread::sleep(Duration::from_millis(2));
        let _ = socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO));
        drop(c);
        round += 1;
        // Pacing only.
        thread::sleep(Duration::from_millis(20));
    }
}

/// --storm: idle connections to /metrics, reopened as memrelay closes them.
fn metrics_flood(port: u16, stop: &AtomicBool) {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut held: Vec<std::net::TcpStream> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        held.retain(|c| {
            let mut b = [0u8; 1];
            let _ = c.set_nonblocking(true);
            // Closed by the far end: read gives 0.
            !matches!(std::io::Read::read(&mut &*c, &mut b), Ok(0))
        });
        while held.len() < 200 {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(c) => held.push(c),
                Err(_) => break,
            }
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// How --relay-chaos restarts memrelay.
#[derive(Debug, Clone, Copy)]
enum RelayAct {
    /// SIGTERM: it drains and saves what servers missed; then a new one.
    Terminate,
    /// SIGKILL: a crash; the new one flushes the servers marked dirty.
    Kill,
    /// A second memrelay takes the sockets over; the old one drains.
    Handoff,
    /// SIGSTOP for 250..750 ms, then SIGCONT: it neither serves nor
    /// answers its peers meanwhile, which to the other members of a fleet
    /// is a member cut off from them (what `--peer-confirm` is about).
    Stop,
}

/// Bytes of memrelay's output kept in memory for the report (its whole
/// log goes to --relay-log).
const RELAY_OUTPUT_KEPT: usize = 256 * 1024;

/// How memrelay `member` is started: `bin args`, its log kept (the tail)
/// and appended to --relay-log with the run's clock and `m<member>`.
fn relay_cmd(
    bin: &Path,
    (member, args): (usize, &[String]),
    origin: Instant,
    cfg: &Cfg,
) -> MemrelayCmd {
    let cmd = Memrelay::cmd(args).bin(bin).keep_last(RELAY_OUTPUT_KEPT);
    match cfg.relay_log.as_deref() {
        Some(p) => cmd.log_file(p, origin, &format!("m{member} ")),
        None => cmd,
    }
}

/// Restarts memrelay on its port; returns a line for the chaos log.
fn restart_relay(
    relay: &mut Memrelay,
    how: RelayAct,
    bin: &Path,
    member: (usize, &[String]),
    origin: Instant,
    cfg: &Cfg,
    watch: &Watch,
) -> Result<String, String> {
    let began = Instant::now();
    let port = relay.port();
    let start = || relay_cmd(bin, member, origin, cfg).port(port).try_start();
    match how {
        RelayAct::Terminate => {
            if !relay.signal_and_wait(libc::SIGTERM, Duration::from_secs(10)) {
                return Err("memrelay did not exit within 10 s of SIGTERM".into());
            }
            *relay = start()?;
        }
        RelayAct::Kill => {
            watch.relay_crashed();
            relay.signal_and_wait(libc::SIGKILL, Duration::from_secs(5));
            watch.relay_crashed();
            *relay = start()?;
        }
        RelayAct::Handoff => {
            let new = start()?;
            let mut old = std::mem::replace(relay, new);
            if !old.wait_exit(Duration::from_secs(10)) {
                return Err("the old memrelay did not exit within 10 s of a hand-off".into());
            }
        }
        RelayAct::Stop => {
            let pid = relay.pid();
            memrelay_testkit::process::signal(pid, libc::SIGSTOP);
            // Pacing: how long it stays stopped (250..750 ms, from the
            // run's clock so the seed's other draws are unchanged).
            let ms = 250 + (began.saturating_duration_since(watch.start).as_micros() % 500) as u64;
            thread::sleep(Duration::from_millis(ms));
            memrelay_testkit::process::signal(pid, libc::SIGCONT);
        }
    }
    Ok(format!(
        "[{:>7}ms] memrelay {how:?}, took {} ms",
        began.saturating_duration_since(watch.start).as_millis(),
        began.elapsed().as_millis()
    ))
}

/// Member m's arguments: the servers (through its links in a fleet), the
/// timeout, its own state file and hand-off path, /metrics on the first.
fn member_args(
    cfg: &Cfg,
    m: usize,
    servers: &[Memcached],
    fleet: Option<&fleet::Fleet>,
    reloads: Option<&reloads::Reloads>,
    state_dir: &Path,
    metrics_port: Option<u16>,
) -> Vec<String> {
    let b = servers.len() - 1;
    let mut args: Vec<String> = match (fleet, reloads) {
        (Some(f), Some(r)) => [r.args(m), f.peer_args(m)].concat(),
        (None, Some(r)) => r.args(m),
        (Some(f), None) => f.args(m),
        (None, None) => {
            let mut a = Vec::new();
            for s in &servers[..b] {
                a.extend(["-s".to_string(), s.addr()]);
            }
            a.extend(["-b".to_string(), servers[b].addr()]);
            a
        }
    };
    args.extend(["--timeout".to_string(), cfg.timeout_arg.clone()]);
    if cfg.relay_chaos {
        args.extend([
            "--state-file".to_string(),
            state_dir.join(format!("state{m}")).display().to_string(),
            "--handoff".to_string(),
            state_dir
                .join(format!("handoff{m}.sock"))
                .display()
                .to_string(),
            "--shutdown-timeout".to_string(),
            "2s".to_string(),
        ]);
    }
    if let (0, Some(port)) = (m, metrics_port) {
        args.extend(["--metrics".to_string(), format!("127.0.0.1:{port}")]);
    }
    args.extend(cfg.extra.iter().cloned());
    args
}

fn run(cfg: &Cfg) -> Result<bool, String> {
    let relay_bin = match &cfg.memrelay {
        Some(p) => PathBuf::from(p),
        None => memrelay_testkit::memrelay::find_memrelay().ok_or(
            "no memrelay binary found ($MEMRELAY_BIN, next to this one, or target/{release,debug}/memrelay): \
             build it, or pass --memrelay PATH",
        )?,
    };
    if !Path::new(&relay_bin).is_file() {
        return Err(format!("{}: no such file", relay_bin.display()));
    }
    let mut servers = Vec::new();
    for _ in 0..=cfg.primaries {
        servers.push(Memcached::launch(&cfg.memcached, "127.0.0.1", &[])?);
    }
    let b = cfg.primaries;
    let members = cfg.fleet.max(1);
    // With --relay-chaos: where the missed-key lists outlive a memrelay, and
    // where a new one takes the sockets over (one of each per member).
    let state_dir = std::env::temp_dir().join(format!("memrelay-chaos-{}", std::process::id()));
    std::fs::create_dir_all(&state_dir).map_err(|e| format!("{}: {e}", state_dir.display()))?;
    let fleet = if members > 1 {
        Some(fleet::Fleet::new(
            members,
            &servers,
            &state_dir,
            cfg.peer_cuts,
        )?)
    } else {
        None
    };
    let metrics_port = if cfg.storm {
        Some(try_free_port("127.0.0.1")?)
    } else {
        None
    };
    let mut reloads = if cfg.reloads {
        Some(reloads::Reloads::new(
            &cfg.memcached,
            members,
            &servers,
            fleet.as_ref(),
            &state_dir,
            cfg.seed,
        )?)
    } else {
        None
    };
    let all_args: Vec<Vec<String>> = (0..members)
        .map(|m| {
            member_args(
                cfg,
                m,
                &servers,
                fleet.as_ref(),
                reloads.as_ref(),
                &state_dir,
                metrics_port,
            )
        })
        .collect();
    // The run's clock starts here, so memrelay's log lines and the
    // histories share one time line.
    let origin = Instant::now();
    if let Some(p) = cfg.relay_log.as_deref() {
        // Each memrelay appends to it: start it empty.
        std::fs::write(p, b"").map_err(|e| format!("{}: {e}", p.display()))?;
    }
    let mut relays: Vec<Memrelay> = all_args
        .iter()
        .enumerate()
        .map(|(m, a)| relay_cmd(&relay_bin, (m, a), origin, cfg).try_start())
        .collect::<Result<_, _>>()?;
    let addrs: Vec<String> = relays.iter().map(Memrelay::addr).collect();
    for addr in &addrs {
        if !wait_until(Duration::from_secs(10), || all_up(addr, b + 1)) {
            return Err(format!(
                "memrelay {addr} never reported every server up: {:?}",
                stats(addr)
            ));
        }
        let peers = |a: &str| stats(a).get("peers_up").cloned().unwrap_or_default();
        if members > 1
            && !wait_until(Duration::from_secs(10), || {
                peers(addr) == (members - 1).to_string()
            })
        {
            return Err(format!("memrelay {addr} never reached its peers"));
        }
    }
    let addr = addrs[0].clone();
    // Keys: client t owns c{t}k{i}; every 4th is a counter.
    let per_client = cfg.keys + TTL_KEYS;
    let names: Vec<Vec<String>> = (0..cfg.clients)
        .map(|t| {
            (0..cfg.keys)
                .map(|i| format!("chaos:c{t}:k{i}"))
                .chain((0..TTL_KEYS).map(|j| format!("chaos:c{t}:t{j}")))
                .collect()
        })
        .collect();
    let flat: Vec<String> = names.iter().flatten().cloned().collect();
    let routes = learn_routing(&addr, &servers[..b], &flat)?;
    let mut per_primary = vec![0usize; b];
    for p in &routes {
        per_primary[*p] += 1;
    }
    let models: Vec<Vec<KeyModel>> = names
        .iter()
        .enumerate()
        .map(|(t, ks)| {
            ks.iter()
                .enumerate()
                .map(|(i, name)| {
                    let ttl_key = i >= cfg.keys;
                    let mut m = KeyModel::new(
                        name.clone(),
                        format!("c{t}k{i}"),
                        !ttl_key && i % 4 == 3,
                        routes[t * per_client + i],
                    );
                    m.ttl_key = ttl_key;
                    m
                })
                .collect()
        })
        .collect();

    println!(
        "memrelay-chaos: seed {}, {:?}, {} clients ({} pipelining) x {} keys, {} primaries + 1 backup; keys per primary {:?}",
        cfg.seed,
        cfg.duration,
        cfg.clients,
        if cfg.pipeline { (0..cfg.clients).filter(|t| t % 3 == 2).count() } else { 0 },
        cfg.keys,
        cfg.primaries,
        per_primary
    );
    for args in &all_args {
        println!("memrelay: {} {}", relay_bin.display(), args.join(" "));
    }
    println!(
        "chaos: primaries{}{}, pause {}..{} ms; latency bound {:?}; settle {:?}",
        if cfg.chaos_backup {
            " and backup"
        } else {
            " only"
        },
        if cfg.overlap {
            ", overlapping outages allowed"
        } else {
            ""
        },
        cfg.pause_ms.0,
        cfg.pause_ms.1,
        bound(cfg),
        cfg.settle
    );

    let watch = Watch::new(origin, cfg.settle, b + 1);
    let stop = AtomicBool::new(false);
    let chaos_cfg = ChaosCfg {
        backup: cfg.chaos_backup,
        overlap: cfg.overlap,
        pause_ms: cfg.pause_ms,
    };
    let mut relay_died = None;
    let mut relay_log: Vec<String> = Vec::new();
    let mut partition_tally = fleet::PartitionTally::default();
    let (mut ends, chaos_tally): (Vec<ClientEnd>, ChaosTally) = thread::scope(|s| {
        let (watch, stop, servers) = (&watch, &stop, &mut servers);
        let seed = cfg.seed;
        let ch = s.spawn(move || chaos::run(servers, watch, chaos_cfg, seed, stop));
        let pt =
            match (&fleet, cfg.partitions) {
                (Some(f), true) => Some(s.spawn(move || {
                    fleet::partitions(f, watch, cfg.timeout, cfg.pause_ms, seed, stop)
                })),
                _ => None,
            };
        if cfg.storm {
            let addr = addr.clone();
            s.spawn(move || disconnect_storm(&addr, stop));
            if let Some(port) = metrics_port {
                s.spawn(move || metrics_flood(port, stop));
            }
        }
        let hs: Vec<_> = models
            .into_iter()
            .enumerate()
            .map(|(t, keys)| {
                let addrs = &addrs;
                s.spawn(move || client(t, cfg, addrs, keys, watch, stop))
            })
            .collect();
        // Pacing: how long the run lasts.
        let end = Instant::now() + cfg.duration;
        let mut rng = Rng::new(seed ^ 0x0072_656c_6179);
        let mut next_restart = Instant::now() + Duration::from_millis(3000 + rng.below(5000));
        let mut reload_rng = Rng::new(seed ^ 0x0072_6f6c_6c73);
        while Instant::now() < end && !INTERRUPTED.load(Ordering::SeqCst) {
            if let Some(r) = reloads.as_mut() {
                if let Some(line) = r.step(&relays, &mut reload_rng, watch) {
                    relay_log.push(line);
                }
            }
            if let Some((m, st)) = relays
                .iter_mut()
                .enumerate()
                .find_map(|(m, r)| r.exited().map(|st| (m, st)))
            {
                relay_died = Some(format!("memrelay {m}: {st}"));
                break;
            }
            if cfg.relay_chaos && Instant::now() >= next_restart {
                let how = cfg.relay_acts[rng.below(cfg.relay_acts.len() as u64) as usize];
                let m = rng.below(members as u64) as usize;
                let (relay, args) = (&mut relays[m], &all_args[m]);
                match restart_relay(relay, how, &relay_bin, (m, args), origin, cfg, watch) {
                    Ok(line) if members > 1 => relay_log.push(format!("{line} (member {m})")),
                    Ok(line) => relay_log.push(line),
                    Err(e) => {
                        relay_died = Some(e);
                        break;
                    }
                }
                next_restart = Instant::now() + Duration::from_millis(3000 + rng.below(5000));
            }
            thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::SeqCst);
        let ends = hs
            .into_iter()
            .enumerate()
            .map(|(t, h)| {
                h.join().unwrap_or_else(|_| ClientEnd {
                    tally: Tally::new(),
                    keys: Vec::new(),
                    error: Some(format!("client {t} panicked")),
                })
            })
            .collect();
        let ct = ch.join().unwrap_or_else(|_| ChaosTally {
            error: Some("chaos thread panicked".into()),
            ..ChaosTally::default()
        });
        if let Some(pt) = pt {
            partition_tally = pt.join().unwrap_or_default();
        }
        (ends, ct)
    });
    let chaos_elapsed = watch.start.elapsed();
    // A rolling reload cut short by the end is finished: a fleet reload
    // holds its members until each has the new list.
    if let Some(r) = reloads.as_mut() {
        if let Err(e) = r.finish(&relays, &watch) {
            relay_died.get_or_insert(e);
        }
    }

    // Right after every server is back (invalidation may be under way),
    // then once memrelay reports every server up.
    // Each client's keys through one member (another for each client).
    for (t, e) in ends.iter_mut().enumerate() {
        final_reads(cfg, &addrs[t % members], &watch, t, e, "after chaos");
    }
    let settled = wait_until(Duration::from_secs(20), || {
        addrs.iter().all(|a| all_up(a, b + 1))
    });
    // Which servers were not up, as each member lists them.
    let not_up: Vec<String> = if settled {
        Vec::new()
    } else {
        addrs
            .iter()
            .enumerate()
            .flat_map(|(m, a)| {
                let s = stats(a);
                let mut down: Vec<String> = s
                    .iter()
                    .filter(|(k, v)| {
                        k.starts_with("server:") && k.ends_with(":state") && *v != "up"
                    })
                    .map(|(k, v)| {
                        let n = k.trim_end_matches(":state");
                        let at = s.get(&format!("{n}:address")).cloned().unwrap_or_default();
                        format!("member {m}: {n} ({at}) {v}")
                    })
                    .collect();
                down.sort();
                down
            })
            .collect()
    };
    for (t, e) in ends.iter_mut().enumerate() {
        final_reads(cfg, &addrs[(t + 1) % members], &watch, t, e, "all up");
    }
    let st = stats(&addr);
    let fleet_stats: Vec<HashMap<String, String>> = if members > 1 {
        addrs.iter().map(|a| stats(a)).collect()
    } else {
        Vec::new()
    };
    for (m, r) in relays.iter_mut().enumerate() {
        if relay_died.is_none() {
            relay_died = r.exited().map(|st| format!("memrelay {m}: {st}"));
        }
    }
    let log_tail = relays
        .iter()
        .enumerate()
        .map(|(m, r)| format!("memrelay {m}:\n{}", r.output_tail(30 / members)))
        .collect::<Vec<_>>()
        .join("\n");
    for r in &mut relays {
        r.stop(Duration::from_secs(2));
    }
    let _ = std::fs::remove_dir_all(&state_dir);
    drop(servers);

    // Report.
    let mut total = Tally::new();
    let mut errors = Vec::new();
    for e in &ends {
        total.merge(&e.tally);
        errors.extend(e.error.clone());
    }
    if let Some(e) = &chaos_tally.error {
        errors.push(format!("chaos thread: {e}"));
    }
    if let Some(s) = &relay_died {
        errors.push(format!("memrelay exited during the run ({s}):\n{log_tail}"));
    }
    if !settled {
        errors.push(format!(
            "memrelay did not report every server up within 20 s of the end of the chaos: {}",
            not_up.join("; ")
        ));
    }
    let stat = |k: &str| st.get(k).cloned().unwrap_or_else(|| "?".into());
    let pct = |n: u64, d: u64| {
        if d == 0 {
            0.0
        } else {
            100.0 * n as f64 / d as f64
        }
    };
    let reads = total.hits + total.misses;
    println!(
        "\nran {:.1?}: {} requests in {} batches ({} pipelined, {} with a key twice or more): set {} ({} with a TTL of 1-3 s), add {}, replace {}, cas {}, get/gets {}, gat/gats {}, multi-get {} ({} keys), delete {}, incr/decr {}, append/prepend {}, touch {}; {} of them in meta form (ms, mg, mg T, md, ma, ma N J)",
        chaos_elapsed,
        total.ops(),
        total.batches,
        total.pipelined_batches,
        total.repeated_key_batches,
        total.sets,
        total.ttl_sets,
        total.adds,
        total.replaces,
        total.cases,
        total.gets,
        total.gats,
        total.multigets,
        total.multiget_keys,
        total.deletes,
        total.incrs,
        total.appends,
        total.touches,
        total.metas
    );
    println!(
        "chaos events: {} (kill {}, restart {}, SIGSTOP {}, SIGCONT {}; {} on the backup)",
        chaos_tally.events(),
        chaos_tally.kills,
        chaos_tally.restarts,
        chaos_tally.stops,
        chaos_tally.conts,
        chaos_tally.backup_events
    );
    if cfg.partitions {
        println!(
            "partial partitions: {} (blackhole {}, reset {}, delay {}; {} of a link between members)",
            partition_tally.log.len(),
            partition_tally.blackholes,
            partition_tally.resets,
            partition_tally.delays,
            partition_tally.peer_cuts
        );
    }
    for (m, fs) in fleet_stats.iter().enumerate() {
        let f = |k: &str| fs.get(k).cloned().unwrap_or_else(|| "?".into());
        println!(
            "fleet member {m}: hints sent {}, received {}, unacked {}, unknown {}",
            f("peer_hints_sent"),
            f("peer_hints_received"),
            f("peer_hints_unacked"),
            f("peer_hints_unknown")
        );
    }
    if cfg.reloads {
        let reloads = relay_log
            .iter()
            .filter(|l| l.contains(" reloaded to "))
            .count();
        println!(
            "reloads: {reloads} member reloads, {} rolling reloads begun (a spare primary added, then removed)",
            reloads.div_ceil(members.max(1))
        );
    }
    if cfg.relay_chaos {
        let count = |w: &str| relay_log.iter().filter(|l| l.contains(w)).count();
        println!(
            "memrelay restarts: {} (SIGTERM {}, SIGKILL {}, hand-off {}, SIGSTOP {})",
            relay_log.len() - count(" reloaded to "),
            count("Terminate"),
            count("Kill"),
            count("Handoff"),
            count("memrelay Stop")
        );
    }
    println!(
        "reads: {} keys: hits {} ({:.1}%), misses {}; guarded reads (had to hit) {}; unchecked hits {}",
        reads,
        total.hits,
        pct(total.hits, reads),
        total.misses,
        total.guarded_reads,
        total.unchecked_hits
    );
    println!(
        "errors: SERVER_ERROR {} (of which writes not confirmed by the fleet {}), no reply {}; incr/append NOT_FOUND/NOT_STORED on a modelled value {} (of which with a replica untouched since the set: {})",
        total.server_errors, total.unconfirmed, total.failures, total.write_misses, total.write_misses_guarded
    );
    println!(
        "latency: p50 {:?}, p99 {:?}, p99.9 {:?}, max {:?} (bound {:?})",
        total.quantile(0.5),
        total.quantile(0.99),
        total.quantile(0.999),
        total.max_latency,
        bound(cfg)
    );
    println!(
        "memrelay: failovers {}, backup_hits {}, repairs {}, mirrors {}, mirror_failures {}",
        stat("failovers"),
        stat("backup_hits"),
        stat("repairs"),
        stat("mirrors"),
        stat("mirror_failures")
    );
    println!(
        "violations: stale {}, lost {}, wrong {}, late {}",
        total.stale, total.lost, total.wrong, total.late
    );
    let ok = total.violations() == 0 && errors.is_empty() && total.ops() > 0;
    if !ok {
        // The first 40 of each kind, the rarest (stale) first; each with
        // the lines that go with it.
        let kinds = memrelay_testkit::model::KINDS.len();
        for kind in 0..=kinds {
            let mut shown = 0;
            let mut showing = false;
            for d in &total.details {
                if !d.starts_with("    ") {
                    showing = memrelay_testkit::model::kind_of(d) == kind && shown < 40;
                    shown += usize::from(showing);
                }
                if showing {
                    println!("  {d}");
                }
            }
        }
        for e in &errors {
            println!("  run error: {e}");
        }
    }
    if cfg.verbose || !ok {
        println!("chaos log:");
        let mut all: Vec<&String> = chaos_tally
            .log
            .iter()
            .chain(relay_log.iter())
            .chain(partition_tally.log.iter())
            .collect();
        all.sort();
        for l in all {
            println!("  {l}");
        }
    }
    if !ok && !log_tail.is_empty() {
        println!("memrelay log (last lines):\n{log_tail}");
    }
    println!("{}", if ok { "PASS" } else { "FAIL" });
    if total.violations() == 0 && !errors.is_empty() {
        return Err("the run did not complete cleanly (see above)".into());
    }
    Ok(ok)
}
