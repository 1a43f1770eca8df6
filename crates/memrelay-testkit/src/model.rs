//! What each client knows about its own keys, and the checks made on every
//! reply. See docs/chaos.md for the rules in prose.
//!
//! Each key is written by one client only, one request at a time (a
//! pipelined batch never holds the same key twice), so "the latest
//! acknowledged state" of a key is well defined: the state its owner's last
//! answered write left.
//!
//! A key's model is the set of states it may be in (`cands`):
//! - after an acknowledged write, exactly one (`Some(item)`, or `None` for
//!   absent);
//! - a write whose outcome is unknown (`SERVER_ERROR`, timeout, closed
//!   connection) may or may not have been applied, so its result joins the
//!   set until the next acknowledged write that fixes the state (set,
//!   delete, or a miss reported by a write).
//!
//! A read hit must be one of the candidates (else: stale if it is an older
//! value of the key, wrong otherwise). A read miss is always allowed, except
//! when the state is exactly known, is a value, and one replica of the key
//! was up and untouched by the chaos thread from `settle` before the write
//! that set the value until the read answered: that replica holds the value
//! and serves it, so a miss means it was lost.
//!
//! The one model checker: memrelay-chaos and the HA tests (tests/ha.rs)
//! both generate `Op`s, send them with [`exchange`] and judge the replies
//! with [`check`]; what a caller knows of the chaos comes in through
//! `Ctx::live_replica`.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::conn::{Conn, Fail, Reply};
use crate::wire::{is_error_line, Val};

/// Candidates kept before a key's state is declared unknown ("wild"): its
/// hits are then not checked until the next set or delete is acknowledged.
const MAX_CANDS: usize = 64;
/// Detailed violation lines kept per client and kind of violation (all
/// are counted): a flood of one kind does not hide the first of another.
const MAX_DETAILS: usize = 40;

/// The kinds of violation, as their detail lines name them.
pub const KINDS: [&str; 4] = ["STALE", "LOST", "WRONG", "LATE"];

/// Which of [`KINDS`] a detail line is (`KINDS.len()` for other lines).
pub fn kind_of(detail: &str) -> usize {
    KINDS
        .iter()
        .position(|k| detail.contains(&format!(": {k}")))
        .unwrap_or(KINDS.len())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub data: String,
    pub flags: u32,
}

/// A request a client sends.
#[derive(Debug, Clone)]
pub enum Op {
    Set {
        k: usize,
        item: Item,
    },
    Get {
        ks: Vec<usize>,
    },
    Delete {
        k: usize,
    },
    /// `incr`, or `decr` (`down`: memcached stops at 0).
    Incr {
        k: usize,
        delta: u64,
        down: bool,
    },
    /// `append`, or `prepend` (`front`).
    Append {
        k: usize,
        suffix: String,
        front: bool,
    },
    /// `replace`: stores only if the key holds an item.
    Replace {
        k: usize,
        item: Item,
    },
    /// `add`: stores only if the key holds no item (a lock).
    Add {
        k: usize,
        item: Item,
    },
    /// `gets`: the value and its CAS unique, kept for a later `cas`.
    Gets {
        k: usize,
    },
    /// `cas` with the unique the last `gets` of the key returned.
    Cas {
        k: usize,
        item: Item,
        unique: u64,
    },
    /// `touch <key> 0`: the item stays, its TTL (none) is copied.
    Touch {
        k: usize,
    },
    /// `gat 0 <keys>`: a read that also sets the TTL (none).
    Gat {
        ks: Vec<usize>,
        /// 0: the items never expire from now on.
        ttl: u32,
        /// `gats`: with the CAS unique, kept for a later `cas` like `gets`'.
        cas: bool,
    },
    /// `set` with a TTL of a few seconds: checked as `set`, and from its
    /// answer on the item must not be served past its expiry.
    SetTtl {
        k: usize,
        item: Item,
        ttl: u32,
    },
    /// The meta forms, checked as their classic twins (`classic`):
    /// `ms <key> <len> F<flags>`, `mg <key> v f`, `md <key>`,
    /// `ma <key> D<delta> v`.
    MetaSet {
        k: usize,
        item: Item,
    },
    /// `mg <key> v f`, or with `T<ttl>` (checked as `gat`).
    MetaGet {
        k: usize,
        ttl: Option<u32>,
    },
    MetaDelete {
        k: usize,
    },
    /// `ma <key> D<delta> v`, or with `N0 J<init>` (autovivify: an absent
    /// counter is created holding `init`).
    MetaIncr {
        k: usize,
        delta: u64,
        init: Option<u64>,
    },
}

/// How a request's reply is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Line,
    Retrieval,
    Meta,
}

impl Op {
    /// The keys it touches.
    pub fn keys(&self) -> Vec<usize> {
        match self {
            Op::Set { k, .. }
            | Op::Add { k, .. }
            | Op::Delete { k }
            | Op::Incr { k, .. }
            | Op::Append { k, .. }
            | Op::Replace { k, .. }
            | Op::Gets { k }
            | Op::Cas { k, .. }
            | Op::Touch { k }
            | Op::MetaSet { k, .. }
            | Op::MetaGet { k, .. }
            | Op::MetaDelete { k }
            | Op::MetaIncr { k, .. } => {
                vec![*k]
            }
            Op::Get { ks } | Op::Gat { ks, .. } => ks.clone(),
            Op::SetTtl { k, .. } => vec![*k],
        }
    }

    pub fn is_read(&self) -> bool {
        matches!(
            self,
            Op::Get { .. } | Op::Gets { .. } | Op::Gat { .. } | Op::MetaGet { .. }
        )
    }

    /// How its reply is read.
    pub fn shape(&self) -> Shape {
        match self {
            Op::MetaSet { .. }
            | Op::MetaGet { .. }
            | Op::MetaDelete { .. }
            | Op::MetaIncr { .. } => Shape::Meta,
            op if op.is_read() => Shape::Retrieval,
            _ => Shape::Line,
        }
    }

    /// A meta request as its classic twin, with its reply as the twin's
    /// would read (`HD` -> `STORED`/`DELETED`, `VA` -> a value or a number,
    /// `EN` -> a miss, `NF` -> `NOT_FOUND`, `NS` -> `NOT_STORED`). Others
    /// are returned as they are.
    pub fn classic(&self, keys: &[KeyModel], reply: Reply) -> (Op, Reply) {
        let line = |l: &str| Reply::Line(l.to_string());
        match (self, reply) {
            (Op::MetaSet { k, item }, Reply::Line(l)) => {
                let r = match l.as_str() {
                    "HD" => line("STORED"),
                    "NS" => line("NOT_STORED"),
                    _ => Reply::Line(l),
                };
                (
                    Op::Set {
                        k: *k,
                        item: item.clone(),
                    },
                    r,
                )
            }
            (Op::MetaGet { k, ttl }, r) => {
                let twin = match ttl {
                    None => Op::Get { ks: vec![*k] },
                    Some(ttl) => Op::Gat {
                        ks: vec![*k],
                        ttl: *ttl,
                        cas: false,
                    },
                };
                let r = match r {
                    Reply::Values(mut v) => {
                        for val in &mut v {
                            val.key = keys[*k].name.clone();
                        }
                        Reply::Values(v)
                    }
                    Reply::Line(l) if l == "EN" => Reply::Values(Vec::new()),
                    r => r,
                };
                (twin, r)
            }
            (Op::MetaDelete { k }, Reply::Line(l)) => {
                let r = match l.as_str() {
                    "HD" => line("DELETED"),
                    "NF" => line("NOT_FOUND"),
                    _ => Reply::Line(l),
                };
                (Op::Delete { k: *k }, r)
            }
            (Op::MetaIncr { k, delta, init }, r) => {
                let r = match r {
                    Reply::Values(v) => match v.first() {
                        Some(val) => Reply::Line(val.data.clone()),
                        None => line("NOT_FOUND"),
                    },
                    Reply::Line(l) if l == "NF" => line("NOT_FOUND"),
                    other => other,
                };
                // The initial value, and no value the key may hold gives it
                // incremented: the counter was created, which is an `add`
                // that stored (allowed where the key may be absent, or
                // counted as a write miss where a failure may have lost
                // it, and a loss where a replica kept it).
                if let (Some(init), Reply::Line(n)) = (init, &r) {
                    let m = &keys[*k];
                    let incremented = m.cands.iter().flatten().any(|c| {
                        c.data
                            .parse::<u64>()
                            .is_ok_and(|v| v.wrapping_add(*delta).to_string() == *n)
                    });
                    if *n == init.to_string() && !incremented {
                        let item = Item {
                            data: n.clone(),
                            flags: 0,
                        };
                        return (Op::Add { k: *k, item }, line("STORED"));
                    }
                }
                (
                    Op::Incr {
                        k: *k,
                        delta: *delta,
                        down: false,
                    },
                    r,
                )
            }
            (op, r) => (op.clone(), r),
        }
    }

    pub fn render(&self, keys: &[KeyModel], out: &mut String) {
        let _ = match self {
            Op::Set { k, item } => write!(
                out,
                "set {} {} 0 {}\r\n{}\r\n",
                keys[*k].name,
                item.flags,
                item.data.len(),
                item.data
            ),
            Op::Get { ks } => {
                out.push_str("get");
                for k in ks {
                    out.push(' ');
                    out.push_str(&keys[*k].name);
                }
                out.push_str("\r\n");
                Ok(())
            }
            Op::Add { k, item } => write!(
                out,
                "add {} {} 0 {}\r\n{}\r\n",
                keys[*k].name,
                item.flags,
                item.data.len(),
                item.data
            ),
            Op::Gets { k } => write!(out, "gets {}\r\n", keys[*k].name),
            Op::Cas { k, item, unique } => write!(
                out,
                "cas {} {} 0 {} {unique}\r\n{}\r\n",
                keys[*k].name,
                item.flags,
                item.data.len(),
                item.data
            ),
            Op::Touch { k } => write!(out, "touch {} 0\r\n", keys[*k].name),
            Op::MetaSet { k, item } => write!(
                out,
                "ms {} {} F{}\r\n{}\r\n",
                keys[*k].name,
                item.data.len(),
                item.flags,
                item.data
            ),
            Op::MetaGet { k, ttl: None } => write!(out, "mg {} v f\r\n", keys[*k].name),
            Op::MetaGet { k, ttl: Some(t) } => write!(out, "mg {} v f T{t}\r\n", keys[*k].name),
            Op::MetaDelete { k } => write!(out, "md {}\r\n", keys[*k].name),
            Op::MetaIncr {
                k,
                delta,
                init: None,
            } => write!(out, "ma {} D{delta} v\r\n", keys[*k].name),
            Op::MetaIncr {
                k,
                delta,
                init: Some(j),
            } => write!(out, "ma {} N0 J{j} D{delta} v\r\n", keys[*k].name),
            Op::SetTtl { k, item, ttl } => write!(
                out,
                "set {} {} {ttl} {}\r\n{}\r\n",
                keys[*k].name,
                item.flags,
                item.data.len(),
                item.data
            ),
            Op::Replace { k, item } => write!(
                out,
                "replace {} {} 0 {}\r\n{}\r\n",
                keys[*k].name,
                item.flags,
                item.data.len(),
                item.data
            ),
            Op::Gat { ks, ttl, cas } => {
                out.push_str(if *cas { "gats " } else { "gat " });
                out.push_str(&ttl.to_string());
                for k in ks {
                    out.push(' ');
                    out.push_str(&keys[*k].name);
                }
                out.push_str("\r\n");
                Ok(())
            }
            Op::Delete { k } => write!(out, "delete {}\r\n", keys[*k].name),
            Op::Incr { k, delta, down } => write!(
                out,
                "{} {} {delta}\r\n",
                if *down { "decr" } else { "incr" },
                keys[*k].name
            ),
            Op::Append { k, suffix, front } => write!(
                out,
                "{} {} 0 0 {}\r\n{suffix}\r\n",
                if *front { "prepend" } else { "append" },
                keys[*k].name,
                suffix.len()
            ),
        };
    }
}

/// What a server takes beyond a link's delay to apply a write that
/// reached it (its socket, its worker).
const LANDING_SLACK: Duration = Duration::from_millis(20);

/// One key as its owning client knows it.
#[derive(Debug, Clone)]
pub struct KeyModel {
    pub name: String,
    /// Counter keys hold numbers (set, incr); the others text (set, append).
    pub counter: bool,
    /// A tag every value of this key starts with (text keys).
    pub tag: String,
    /// Index of the key's primary (learned at setup).
    pub primary: usize,
    /// Written rarely, with short TTLs, and read often: the reads that
    /// come after its expiry check that no replica outlives it.
    pub ttl_key: bool,
    /// The states the key may be in.
    cands: Vec<Option<Item>>,
    /// One state, fixed by acknowledged writes only (no unknown outcome
    /// since the last set or delete).
    exact: bool,
    /// When the set that began the current value was sent.
    base_sent: Option<Instant>,
    /// Too many unknown outcomes: hits unchecked until the next set/delete.
    wild: bool,
    /// Acknowledged writes that changed the item (each changes its CAS).
    changes: u64,
    /// The unique the last `gets` returned, with `changes` then.
    pub gets_unique: Option<(u64, u64)>,
    /// When the exactly known item has surely expired (set with a TTL, or
    /// a `gat` that gave it one); None: it does not expire.
    expiry: Option<Instant>,
    /// A `gat` with a TTL got no answer: it may or may not have set one,
    /// so neither a hit past the old expiry nor a miss says anything
    /// until the next acknowledged `set` or `gat`.
    ttl_unknown: bool,
    /// When a write's outcome was last found unknown, no replica had been
    /// up and untouched since the value was set: every replica may have
    /// lost the key, so a create-if-absent (`add`) may have stored.
    may_be_lost: bool,
    /// From when the item set with a TTL may have expired on a server
    /// (memcached's clock ticks in whole seconds: up to a second early).
    may_expire: Option<Instant>,
    history: VecDeque<String>,
    /// Writes whose outcome is unknown that may still land, with the time
    /// until which they may (`Ctx::in_flight`): what each leaves (a value,
    /// or no item). A write acknowledged before then may be overtaken.
    in_flight: Vec<(Instant, Option<Item>)>,
}

impl KeyModel {
    pub fn new(name: String, tag: String, counter: bool, primary: usize) -> KeyModel {
        KeyModel {
            name,
            counter,
            tag,
            primary,
            ttl_key: false,
            cands: vec![None],
            exact: true,
            base_sent: None,
            wild: false,
            changes: 0,
            gets_unique: None,
            expiry: None,
            ttl_unknown: false,
            may_be_lost: false,
            may_expire: None,
            history: VecDeque::new(),
            in_flight: Vec::new(),
        }
    }

    /// The value if the state is exactly known to be one (else None).
    pub fn known_value(&self) -> Option<&Item> {
        match self.cands.as_slice() {
            [Some(i)] if self.exact && !self.wild => Some(i),
            _ => None,
        }
    }

    fn log(&mut self, at: u128, what: String) {
        if self.history.len() == 8 {
            self.history.pop_front();
        }
        self.history.push_back(format!("{at}ms {what}"));
    }

    fn describe(&self) -> String {
        let c: Vec<String> = self
            .cands
            .iter()
            .map(|c| match c {
                None => "absent".to_string(),
                Some(i) => format!("{:?}/f{}", i.data, i.flags),
            })
            .collect();
        format!(
            "primary {}; model {}{} [{}]; recent: {:?}",
            self.primary,
            if self.exact {
                "exact"
            } else {
                "unknown-outcome"
            },
            if self.wild { " (wild)" } else { "" },
            c.join(", "),
            self.history
        )
    }

    fn ack_value(&mut self, item: Item, sent: Instant) {
        self.changes += 1;
        self.expiry = None;
        self.may_expire = None;
        self.ttl_unknown = false;
        self.cands = vec![Some(item)];
        self.exact = true;
        self.wild = false;
        self.base_sent = Some(sent);
        self.overtaken(sent);
    }

    fn ack_absent(&mut self, sent: Instant) {
        self.expiry = None;
        self.may_expire = None;
        self.ttl_unknown = false;
        self.cands = vec![None];
        self.exact = true;
        self.wild = false;
        self.base_sent = None;
        self.overtaken(sent);
    }

    /// A write sent at `sent` was acknowledged: a write of unknown outcome
    /// still in flight then may land after it.
    fn overtaken(&mut self, sent: Instant) {
        self.in_flight.retain(|(until, _)| *until > sent);
        if self.in_flight.is_empty() {
            return;
        }
        for (_, v) in &self.in_flight {
            if !self.cands.contains(v) {
                self.cands.push(v.clone());
            }
        }
        self.exact = false;
        if self.cands.len() > MAX_CANDS {
            self.wild = true;
            self.cands.truncate(MAX_CANDS);
        }
    }

    /// An unknown outcome: the state may be any candidate, or `f` of it.
    fn maybe(&mut self, f: impl Fn(&Option<Item>) -> Option<Option<Item>>) {
        let extra: Vec<Option<Item>> = self.cands.iter().filter_map(f).collect();
        for e in extra {
            if !self.cands.contains(&e) {
                self.cands.push(e);
            }
        }
        self.exact = false;
        if self.cands.len() > MAX_CANDS {
            self.wild = true;
            self.cands.truncate(MAX_CANDS);
        }
    }

    fn allows(&self, v: &Val) -> bool {
        self.cands.iter().flatten().any(|c| {
            c.flags == v.flags
                && if self.counter {
                    c.data == v.data.trim_end_matches(' ')
                } else {
                    c.data == v.data
                }
        })
    }

    /// Is `data` something this key held at some point (a stale value) as
    /// opposed to something it never held (wrong)?
    fn could_be_ours(&self, data: &str) -> bool {
        if self.counter {
            data.trim_end_matches(' ').parse::<u64>().is_ok()
        } else {
            // A prepend puts the tag after its part.
            data.contains(&self.tag)
        }
    }
}

/// Counts, and the details of the first violations.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub sets: u64,
    pub gets: u64,
    pub multigets: u64,
    pub multiget_keys: u64,
    pub deletes: u64,
    pub incrs: u64,
    pub appends: u64,
    pub adds: u64,
    pub replaces: u64,
    pub gats: u64,
    pub cases: u64,
    pub touches: u64,
    /// Requests sent in their meta form (counted under their twin too).
    pub metas: u64,
    pub ttl_sets: u64,
    /// Batches that hold one key more than once.
    pub repeated_key_batches: u64,
    pub batches: u64,
    pub pipelined_batches: u64,
    pub hits: u64,
    pub misses: u64,
    /// Reads of keys whose value a live, untouched replica held: each had
    /// to hit.
    pub guarded_reads: u64,
    /// Hits not checked (key state unknown after too many failed writes).
    pub unchecked_hits: u64,
    /// NOT_FOUND / NOT_STORED from incr or append on a key the model holds
    /// a value for (allowed: a failure can lose a key).
    pub write_misses: u64,
    /// ... of which one replica had been untouched since the value was set.
    pub write_misses_guarded: u64,
    pub server_errors: u64,
    /// ... of which writes a fleet member refused because too few peers
    /// could be told (`--peer-confirm majority|all`): allowed while a
    /// server misses writes, whatever else is up.
    pub unconfirmed: u64,
    /// No reply (timeout, closed, garbled).
    pub failures: u64,
    pub stale: u64,
    pub lost: u64,
    pub wrong: u64,
    pub late: u64,
    pub max_latency: Duration,
    /// Latency histogram, 1 ms buckets up to 10 s (last bucket: above).
    pub hist: Vec<u64>,
    pub details: Vec<String>,
    /// Details kept of each kind (`kind_of`), and whether the last line
    /// was kept (the lines that follow a violation go with it).
    kept: [usize; KINDS.len() + 1],
    last_kept: bool,
}

impl Tally {
    pub fn new() -> Tally {
        Tally {
            hist: vec![0; 10_001],
            ..Tally::default()
        }
    }

    pub fn merge(&mut self, o: &Tally) {
        macro_rules! add {
            ($($f:ident),*) => { $( self.$f += o.$f; )* };
        }
        add!(
            sets,
            gets,
            multigets,
            multiget_keys,
            deletes,
            incrs,
            appends,
            adds,
            replaces,
            gats,
            cases,
            touches,
            metas,
            ttl_sets,
            repeated_key_batches,
            batches,
            pipelined_batches,
            hits,
            misses,
            guarded_reads,
            unchecked_hits,
            write_misses,
            write_misses_guarded,
            server_errors,
            unconfirmed,
            failures,
            stale,
            lost,
            wrong,
            late
        );
        self.max_latency = self.max_latency.max(o.max_latency);
        for (a, b) in self.hist.iter_mut().zip(&o.hist) {
            *a += b;
        }
        self.details.extend(o.details.iter().cloned());
    }

    pub fn ops(&self) -> u64 {
        self.sets
            + self.gets
            + self.multigets
            + self.deletes
            + self.incrs
            + self.appends
            + self.adds
            + self.replaces
            + self.gats
            + self.cases
            + self.touches
    }

    pub fn violations(&self) -> u64 {
        self.stale + self.lost + self.wrong + self.late
    }

    /// The latency below which `q` (0..1) of the requests were answered.
    pub fn quantile(&self, q: f64) -> Duration {
        let total: u64 = self.hist.iter().sum();
        let want = (total as f64 * q).ceil() as u64;
        let mut seen = 0;
        for (ms, n) in self.hist.iter().enumerate() {
            seen += n;
            if seen >= want.max(1) {
                return Duration::from_millis(ms as u64);
            }
        }
        Duration::from_millis(self.hist.len() as u64)
    }

    fn detail(&mut self, s: String) {
        if s.starts_with("    ") {
            // The context of the violation before it.
            if self.last_kept {
                self.details.push(s);
            }
            return;
        }
        let kind = kind_of(&s);
        self.last_kept = self.kept[kind] < MAX_DETAILS;
        if self.last_kept {
            self.kept[kind] += 1;
            self.details.push(s);
        }
    }
}

/// What a check needs besides the key: when the run started (for
/// timestamps), the latency bound, and whether one replica of a key (given
/// its primary) has been up and untouched since `settle` before an instant.
pub struct Ctx<'a> {
    pub start: Instant,
    pub client: usize,
    pub phase: &'a str,
    pub bound: Duration,
    pub live_replica: &'a dyn Fn(usize, Instant) -> bool,
    /// Count an incr/append that found no item although a replica held
    /// the key's value as lost (docs/ha.md allows it: see docs/chaos.md).
    pub strict_writes: bool,
    /// How long after it was sent a write whose outcome is unknown may
    /// still reach a server: the longest delay the run puts on a link
    /// (zero without delays). A packet already sent arrives, even after
    /// its sender died, and can land over a later write made through
    /// another path; nothing can recall it (docs/chaos.md).
    pub in_flight: Duration,
}

impl std::fmt::Debug for Ctx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("client", &self.client)
            .field("phase", &self.phase)
            .field("bound", &self.bound)
            .field("strict_writes", &self.strict_writes)
            .finish_non_exhaustive()
    }
}

impl Ctx<'_> {
    fn ms(&self, t: Instant) -> u128 {
        t.saturating_duration_since(self.start).as_millis()
    }

    /// Until when a write sent at `sent` whose outcome is unknown may
    /// still land (None: not past its answer).
    fn lands_until(&self, sent: Instant) -> Option<Instant> {
        (!self.in_flight.is_zero()).then(|| sent + self.in_flight + LANDING_SLACK)
    }
}

/// Checks the reply to `op` (sent at `sent`, answered at `now`) and updates
/// the model. Returns false when the connection must be replaced (no reply,
/// or a reply that leaves the stream's framing in doubt).
pub fn check(
    ctx: &Ctx,
    tally: &mut Tally,
    keys: &mut [KeyModel],
    op: &Op,
    reply: &Result<Reply, Fail>,
    sent: Instant,
    now: Instant,
) -> bool {
    if let Op::SetTtl { k, item, ttl } = op {
        tally.ttl_sets += 1;
        let twin = Op::Set {
            k: *k,
            item: item.clone(),
        };
        let ok = check(ctx, tally, keys, &twin, reply, sent, now);
        if matches!(reply, Ok(Reply::Line(l)) if l == "STORED") {
            keys[*k].expiry = expiry_after(*ttl, now);
            keys[*k].may_expire = (*ttl > 0)
                .then(|| sent + Duration::from_secs(u64::from(*ttl)) - Duration::from_secs(1));
            // The history shows the twin's line (TTL 0): say which it was.
            keys[*k].log(ctx.ms(sent), format!("(that set had a TTL of {ttl} s)"));
        }
        return ok;
    }
    if op.shape() == Shape::Meta {
        tally.metas += 1;
        let unknown = match reply {
            Err(_) => true,
            Ok(Reply::Line(l)) => l.starts_with("SERVER_ERROR"),
            Ok(_) => false,
        };
        if let (
            Op::MetaIncr {
                k, init: Some(j), ..
            },
            true,
        ) = (op, unknown)
        {
            // It may have created the counter where the key was absent,
            // or may have been lost (as of now: the twin's check below
            // sees the same).
            note_loss(ctx, &mut keys[*k]);
            let lost = keys[*k].may_be_lost;
            keys[*k].maybe(|c| {
                (c.is_none() || lost).then(|| {
                    Some(Item {
                        data: j.to_string(),
                        flags: 0,
                    })
                })
            });
        }
        let (twin, reply) = match reply {
            Ok(r) => {
                let (twin, r) = op.classic(keys, r.clone());
                (twin, Ok(r))
            }
            Err(f) => (
                op.classic(keys, Reply::Line(String::new())).0,
                Err(f.clone()),
            ),
        };
        return check(ctx, tally, keys, &twin, &reply, sent, now);
    }
    let took = now.saturating_duration_since(sent);
    tally.max_latency = tally.max_latency.max(took);
    let bucket = (took.as_millis() as usize).min(tally.hist.len() - 1);
    tally.hist[bucket] += 1;
    let at = ctx.ms(sent);
    let who = format!("[{at:>7}ms] {} client {}", ctx.phase, ctx.client);
    match op {
        Op::Set { .. } => tally.sets += 1,
        Op::Get { ks } if ks.len() == 1 => tally.gets += 1,
        Op::Get { ks } => {
            tally.multigets += 1;
            tally.multiget_keys += ks.len() as u64;
        }
        Op::Delete { .. } => tally.deletes += 1,
        Op::Incr { .. } => tally.incrs += 1,
        Op::Append { .. } => tally.appends += 1,
        Op::Add { .. } => tally.adds += 1,
        Op::Replace { .. } => tally.replaces += 1,
        Op::Gets { .. } => tally.gets += 1,
        Op::Gat { .. } => tally.gats += 1,
        Op::Cas { .. } => tally.cases += 1,
        Op::Touch { .. } => tally.touches += 1,
        // Translated to their classic twins above.
        Op::MetaSet { .. }
        | Op::MetaGet { .. }
        | Op::MetaDelete { .. }
        | Op::MetaIncr { .. }
        | Op::SetTtl { .. } => {}
    }
    let render = {
        let mut s = String::new();
        op.render(keys, &mut s);
        let first = s.lines().next().unwrap_or("").to_string();
        first
    };
    if took > ctx.bound {
        tally.late += 1;
        tally.detail(format!(
            "{who}: LATE: {render:?} answered after {took:?} (bound {:?}): {reply:?}",
            ctx.bound
        ));
    }
    let reply = match reply {
        Ok(r) => r,
        Err(f) => {
            tally.failures += 1;
            for k in op.keys() {
                keys[k].log(at, format!("{render} -> {f}"));
            }
            unknown_outcome(keys, op, ctx.lands_until(sent));
            return false;
        }
    };
    let asked = Asked {
        sent,
        now,
        who: &who,
        render: &render,
    };
    match (op, reply) {
        (Op::Get { ks }, Reply::Values(vals)) => {
            check_values(ctx, tally, keys, ks, vals, &asked);
            true
        }
        (Op::Gat { ks, ttl, cas }, Reply::Values(vals)) => {
            check_values(ctx, tally, keys, ks, vals, &asked);
            for k in ks {
                let m = &mut keys[*k];
                let hit = vals.iter().find(|v| v.key == m.name);
                if hit.is_some() {
                    m.expiry = expiry_after(*ttl, now);
                    m.ttl_unknown = false;
                }
                if *cas {
                    m.gets_unique = hit.and_then(|v| v.cas).map(|c| (c, m.changes));
                }
            }
            true
        }
        (Op::Gets { k }, Reply::Values(vals)) => {
            check_values(ctx, tally, keys, &[*k], vals, &asked);
            let m = &mut keys[*k];
            m.gets_unique = vals
                .iter()
                .find(|v| v.key == m.name)
                .and_then(|v| v.cas)
                .map(|c| (c, m.changes));
            true
        }
        (Op::Get { ks } | Op::Gat { ks, .. }, Reply::Line(l)) => {
            tally.server_errors += 1;
            tally.wrong += 1;
            tally.detail(format!(
                "{who}: WRONG: {render:?} answered {l:?}; a read must answer (misses at worst) with END"
            ));
            for k in ks {
                keys[*k].log(at, format!("get -> {l}"));
            }
            false
        }
        (_, Reply::Values(v)) => {
            tally.wrong += 1;
            tally.detail(format!("{who}: WRONG: {render:?} answered values {v:?}"));
            unknown_outcome(keys, op, ctx.lands_until(sent));
            false
        }
        (_, Reply::Line(l)) => {
            check_write(ctx, tally, keys, op, l, &asked);
            true
        }
    }
}

/// A counter after `incr` (`down`: `decr`, which stops at 0) by `delta`.
fn counted(n: u64, delta: u64, down: bool) -> u64 {
    if down {
        n.saturating_sub(delta)
    } else {
        n.wrapping_add(delta)
    }
}

/// memrelay's answer to a write under `--peer-confirm majority|all` when
/// too few members of its fleet could be told what the write went past.
pub const UNCONFIRMED: &str = "SERVER_ERROR write not confirmed by the fleet";

/// A value after `append` (`front`: `prepend`) of `part`.
fn joined(data: &str, part: &str, front: bool) -> String {
    if front {
        format!("{part}{data}")
    } else {
        format!("{data}{part}")
    }
}

/// One request as the checks report it: when it was sent and answered,
/// who sent it, and its first line.
struct Asked<'a> {
    sent: Instant,
    now: Instant,
    who: &'a str,
    render: &'a str,
}

/// How long past a TTL an item may still be served: memcached's clock
/// ticks in seconds, and a copy (mirror, repair, resync) carries the
/// remaining TTL in whole seconds, a moment after the original: a value
/// repaired onto a restarted primary can outlive its TTL by about a second
/// more (docs/ha.md, Limits).
const EXPIRY_SLACK: Duration = Duration::from_secs(4);

/// When an item given `ttl` seconds at `now` has surely expired.
fn expiry_after(ttl: u32, now: Instant) -> Option<Instant> {
    (ttl > 0).then(|| now + Duration::from_secs(u64::from(ttl)) + EXPIRY_SLACK)
}

/// The effect of a write that may or may not have been applied.
fn unknown_outcome(keys: &mut [KeyModel], op: &Op, lands_until: Option<Instant>) {
    if op.shape() == Shape::Meta {
        let twin = op.classic(keys, Reply::Line(String::new())).0;
        return unknown_outcome(keys, &twin, lands_until);
    }
    // A write that leaves a whole value (or none) may yet land over a
    // later write (`in_flight`). An `add` or a `replace` then stores only
    // if the key is absent (present) as it lands: its value is a
    // candidate either way. A `cas` finds its unique changed by the later
    // write, and stores nothing; appends and counters, which build on
    // what they land on, are not modelled landing late.
    if let Some(until) = lands_until {
        let (k, left) = match op {
            Op::Set { k, item }
            | Op::SetTtl { k, item, .. }
            | Op::Add { k, item }
            | Op::Replace { k, item } => (*k, Some(item.clone())),
            Op::Delete { k } => (*k, None),
            _ => return unknown_effect(keys, op),
        };
        let pending = &mut keys[k].in_flight;
        // Bounded: a key that fails all the time keeps only its latest.
        if pending.len() >= MAX_CANDS {
            pending.remove(0);
        }
        pending.push((until, left));
    }
    unknown_effect(keys, op)
}

/// What a write of unknown outcome may have made of its keys by now.
fn unknown_effect(keys: &mut [KeyModel], op: &Op) {
    match op {
        Op::Gat { ks, .. } => {
            // It may have set its TTL (or removed one) on any replica.
            for k in ks {
                keys[*k].ttl_unknown = true;
            }
        }
        Op::Get { .. } | Op::Gets { .. } => {}
        // It may have made the item immortal on any replica.
        Op::Touch { k } => keys[*k].ttl_unknown = true,
        Op::SetTtl { k, item, .. } => keys[*k].maybe(|_| Some(Some(item.clone()))),
        Op::MetaSet { .. } | Op::MetaGet { .. } | Op::MetaDelete { .. } | Op::MetaIncr { .. } => {}
        Op::Cas { k, item, .. } => keys[*k].maybe(|c| c.is_some().then(|| Some(item.clone()))),
        Op::Set { k, item } => keys[*k].maybe(|_| Some(Some(item.clone()))),
        Op::Add { k, item } => {
            let lost = keys[*k].may_be_lost;
            keys[*k].maybe(|c| (c.is_none() || lost).then(|| Some(item.clone())))
        }
        Op::Replace { k, item } => keys[*k].maybe(|c| c.is_some().then(|| Some(item.clone()))),
        Op::Delete { k } => keys[*k].maybe(|_| Some(None)),
        Op::Incr { k, delta, down } => keys[*k].maybe(|c| {
            let c = c.as_ref()?;
            let n: u64 = c.data.parse().ok()?;
            Some(Some(Item {
                data: counted(n, *delta, *down).to_string(),
                flags: c.flags,
            }))
        }),
        Op::Append { k, suffix, front } => keys[*k].maybe(|c| {
            let c = c.as_ref()?;
            Some(Some(Item {
                data: joined(&c.data, suffix, *front),
                flags: c.flags,
            }))
        }),
    }
}

fn check_values(
    ctx: &Ctx,
    tally: &mut Tally,
    keys: &mut [KeyModel],
    ks: &[usize],
    vals: &[Val],
    asked: &Asked,
) {
    let (sent, now, who) = (asked.sent, asked.now, asked.who);
    let at = ctx.ms(sent);
    // The read as the key's history shows it: its command, and a TTL it
    // sets (`gat 2`, `mg ... T2`), not its keys.
    let read = match asked
        .render
        .split_whitespace()
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["gat" | "gats", ttl, ..] => format!(
            "{} {ttl}",
            &asked.render[..asked.render.find(' ').unwrap_or(0)]
        ),
        ["mg", _, rest @ ..] => format!("mg {}", rest.join(" ")),
        [cmd, ..] => (*cmd).to_string(),
        [] => "get".to_string(),
    };
    // Values come in request order, each key at most once, only keys asked.
    let mut next = 0;
    let mut got: Vec<Option<&Val>> = vec![None; ks.len()];
    for v in vals {
        match ks[next..].iter().position(|k| keys[*k].name == v.key) {
            Some(p) => {
                got[next + p] = Some(v);
                next += p + 1;
            }
            None => {
                tally.wrong += 1;
                tally.detail(format!(
                    "{who}: WRONG: get of {:?} returned {:?} out of order or unasked",
                    ks.iter().map(|k| &keys[*k].name).collect::<Vec<_>>(),
                    v.key
                ));
                return;
            }
        }
    }
    for (k, v) in ks.iter().zip(got) {
        let m = &mut keys[*k];
        let guarded = m.known_value().is_some()
            && m.expiry.is_none()
            && !m.ttl_unknown
            && m.base_sent
                .is_some_and(|b| (ctx.live_replica)(m.primary, b));
        if let (Some(v), Some(e)) = (v, m.expiry) {
            if m.exact && !m.wild && !m.ttl_unknown && sent > e {
                tally.stale += 1;
                tally.detail(format!(
                    "{who}: STALE: {:?} served {:?}, which expired {:?} before the read; {}",
                    m.name,
                    v.data,
                    sent.saturating_duration_since(e),
                    m.describe()
                ));
            }
        }
        if guarded {
            tally.guarded_reads += 1;
        }
        match v {
            None => {
                tally.misses += 1;
                if guarded {
                    tally.lost += 1;
                    let d = format!(
                        "{who}: LOST: get {} missed although replica(s) of it stayed up and untouched since its value was set; {}",
                        m.name,
                        m.describe()
                    );
                    tally.detail(d);
                } else if !m.cands.contains(&None) {
                    // An allowed miss (the value may have been lost): the
                    // key may be absent now, so an `add` whose outcome is
                    // unknown may have stored.
                    m.maybe(|_| Some(None));
                }
                m.log(at, format!("{read} -> miss"));
            }
            Some(v) => {
                tally.hits += 1;
                m.log(at, format!("{read} -> {:?}/f{}", v.data, v.flags));
                if m.wild {
                    tally.unchecked_hits += 1;
                } else if !m.allows(v) {
                    // The right data with other flags is wrong, not stale.
                    let same_data = m.cands.iter().flatten().any(|c| c.data == v.data);
                    let stale = !same_data && m.could_be_ours(&v.data);
                    if stale {
                        tally.stale += 1;
                    } else {
                        tally.wrong += 1;
                    }
                    tally.detail(format!(
                        "{who}: {}: get {} served {:?} flags {} (answered after {:?}); {}",
                        if stale { "STALE" } else { "WRONG" },
                        m.name,
                        v.data,
                        v.flags,
                        now.saturating_duration_since(sent),
                        m.describe()
                    ));
                }
            }
        }
    }
}

fn check_write(
    ctx: &Ctx,
    tally: &mut Tally,
    keys: &mut [KeyModel],
    op: &Op,
    l: &str,
    asked: &Asked,
) {
    let (sent, who, render) = (asked.sent, asked.who, asked.render);
    let at = ctx.ms(sent);
    let k = op.keys()[0];
    let m = &mut keys[k];
    m.log(at, format!("{render} -> {l}"));
    note_loss(ctx, m);
    let guarded = m.known_value().is_some()
        && m.expiry.is_none()
        && !m.ttl_unknown
        && m.base_sent
            .is_some_and(|b| (ctx.live_replica)(m.primary, b));
    let wrong = |tally: &mut Tally, m: &KeyModel, why: &str| {
        tally.wrong += 1;
        tally.detail(format!(
            "{who}: WRONG: {render:?} answered {l:?}: {why}; {}",
            m.describe()
        ));
    };
    if l.starts_with("SERVER_ERROR") {
        tally.server_errors += 1;
        // Only when both replicas are unreachable; one that was up and
        // untouched since `settle` before the request was sent is not.
        // The exception is a fleet's refusal of a write it could not
        // confirm: a server (any one, or a member's link to it) missed a
        // write, and too few members could be told.
        if l == UNCONFIRMED {
            tally.unconfirmed += 1;
        } else if (ctx.live_replica)(m.primary, sent) {
            wrong(tally, m, "a replica of the key was up and untouched");
        }
        unknown_outcome(keys, op, ctx.lands_until(sent));
        return;
    }
    if is_error_line(l) {
        wrong(tally, m, "an error for a well-formed request");
        unknown_outcome(keys, op, ctx.lands_until(sent));
        return;
    }
    match op {
        Op::Get { .. }
        | Op::Gets { .. }
        | Op::Gat { .. }
        | Op::MetaSet { .. }
        | Op::MetaGet { .. }
        | Op::MetaDelete { .. }
        | Op::MetaIncr { .. }
        | Op::SetTtl { .. } => {}
        Op::Set { item, .. } => {
            if l == "STORED" {
                m.ack_value(item.clone(), sent);
            } else {
                wrong(tally, m, "set answers STORED");
                unknown_outcome(keys, op, ctx.lands_until(sent));
            }
        }
        Op::Cas { item, unique, .. } => match l {
            "STORED" => {
                let since = m.gets_unique.filter(|(u, _)| u == unique).map(|(_, c)| c);
                if !m.wild && since.is_some_and(|c| c != m.changes) {
                    wrong(
                        tally,
                        m,
                        "cas accepted a unique from before a later acknowledged write",
                    );
                }
                m.ack_value(item.clone(), sent);
            }
            // A unique from before a failover or a restart: allowed.
            "EXISTS" => {}
            "NOT_FOUND" => {
                write_miss(ctx, tally, m, guarded, who, render, l);
                m.ack_absent(sent);
            }
            _ => {
                wrong(tally, m, "cas answers STORED, EXISTS or NOT_FOUND");
                unknown_outcome(keys, op, ctx.lands_until(sent));
            }
        },
        Op::Touch { .. } => match l {
            "TOUCHED" => {
                if !m.wild && m.cands.iter().all(Option::is_none) {
                    wrong(
                        tally,
                        m,
                        "touched a key the model says is absent: something brought it back",
                    );
                    m.wild = true;
                }
                m.cands.retain(Option::is_some);
                // `touch <key> 0`: the item never expires from now on.
                m.expiry = None;
                m.ttl_unknown = false;
            }
            "NOT_FOUND" => {
                write_miss(ctx, tally, m, guarded, who, render, l);
                m.ack_absent(sent);
            }
            _ => {
                wrong(tally, m, "touch answers TOUCHED or NOT_FOUND");
                unknown_outcome(keys, op, ctx.lands_until(sent));
            }
        },
        Op::Add { item, .. } => match l {
            "STORED" => {
                if !m.wild && m.cands.iter().all(Option::is_some) {
                    // The key held a value: the add should have been
                    // refused. Allowed only if every replica lost it.
                    write_miss(ctx, tally, m, guarded, who, render, l);
                }
                m.ack_value(item.clone(), sent);
            }
            "NOT_STORED" => {
                if !m.wild && m.cands.iter().all(Option::is_none) {
                    wrong(
                        tally,
                        m,
                        "add refused on a key the model says is absent: an old item came back",
                    );
                    m.wild = true;
                } else {
                    m.cands.retain(Option::is_some);
                }
            }
            _ => {
                wrong(tally, m, "add answers STORED or NOT_STORED");
                unknown_outcome(keys, op, ctx.lands_until(sent));
            }
        },
        Op::Delete { .. } => match l {
            "DELETED" => {
                if !m.wild && m.cands.iter().all(Option::is_none) {
                    wrong(tally, m, "the key was deleted: something brought it back");
                }
                m.ack_absent(sent);
                m.changes += 1;
            }
            "NOT_FOUND" => m.ack_absent(sent),
            _ => {
                wrong(tally, m, "delete answers DELETED or NOT_FOUND");
                unknown_outcome(keys, op, ctx.lands_until(sent));
            }
        },
        Op::Incr { delta, down, .. } => {
            if l == "NOT_FOUND" {
                write_miss(ctx, tally, m, guarded, who, render, l);
                m.ack_absent(sent);
            } else if let Ok(n) = l.parse::<u64>() {
                let from: Vec<Option<Item>> = m
                    .cands
                    .iter()
                    .filter(|c| {
                        c.as_ref()
                            .and_then(|c| c.data.parse::<u64>().ok())
                            .is_some_and(|v| counted(v, *delta, *down) == n)
                    })
                    .map(|c| {
                        c.as_ref().map(|c| Item {
                            data: n.to_string(),
                            flags: c.flags,
                        })
                    })
                    .collect();
                if from.is_empty() && !m.wild {
                    // An increment below its delta cannot come from any
                    // value; a decrement can.
                    let stale = *down || n >= *delta;
                    if stale {
                        tally.stale += 1;
                    } else {
                        tally.wrong += 1;
                    }
                    tally.detail(format!(
                        "{who}: {}: {render:?} answered {n}: not a value the key may hold, changed by {delta}; {}",
                        if stale { "STALE" } else { "WRONG" },
                        m.describe()
                    ));
                    m.cands = vec![Some(Item {
                        data: n.to_string(),
                        flags: 0,
                    })];
                    m.wild = true;
                } else if !from.is_empty() {
                    m.cands = from;
                    m.cands.dedup();
                    m.changes += 1;
                    m.overtaken(sent);
                } else {
                    // Wild: the value is now known, its flags are not.
                    m.cands = vec![Some(Item {
                        data: n.to_string(),
                        flags: 0,
                    })];
                }
            } else {
                wrong(tally, m, "incr and decr answer a number or NOT_FOUND");
                unknown_outcome(keys, op, ctx.lands_until(sent));
            }
        }
        Op::Append { suffix, front, .. } => match l {
            "STORED" => {
                let next: Vec<Option<Item>> = m
                    .cands
                    .iter()
                    .flatten()
                    .map(|c| {
                        Some(Item {
                            data: joined(&c.data, suffix, *front),
                            flags: c.flags,
                        })
                    })
                    .collect();
                if next.is_empty() && !m.wild {
                    wrong(tally, m, "append to a key the model says is absent");
                    m.wild = true;
                } else {
                    m.cands = next;
                }
                m.changes += 1;
                m.overtaken(sent);
            }
            "NOT_STORED" => {
                write_miss(ctx, tally, m, guarded, who, render, l);
                m.ack_absent(sent);
            }
            _ => {
                wrong(tally, m, "append and prepend answer STORED or NOT_STORED");
                unknown_outcome(keys, op, ctx.lands_until(sent));
            }
        },
        Op::Replace { item, .. } => match l {
            "STORED" => {
                if !m.wild && m.cands.iter().all(Option::is_none) {
                    wrong(
                        tally,
                        m,
                        "replace stored on a key the model says is absent: something brought it back",
                    );
                }
                m.ack_value(item.clone(), sent);
            }
            "NOT_STORED" => {
                write_miss(ctx, tally, m, guarded, who, render, l);
                m.ack_absent(sent);
            }
            _ => {
                wrong(tally, m, "replace answers STORED or NOT_STORED");
                unknown_outcome(keys, op, ctx.lands_until(sent));
            }
        },
    }
}

/// incr or append found no item: allowed by docs/ha.md after a failure
/// (the primary answered, its backup's copy is dropped), counted; a loss
/// under --strict-writes when a replica held the value all along.
fn write_miss(
    ctx: &Ctx,
    tally: &mut Tally,
    m: &KeyModel,
    guarded: bool,
    who: &str,
    render: &str,
    l: &str,
) {
    if !m.cands.iter().any(Option::is_some) {
        return;
    }
    tally.write_misses += 1;
    if guarded {
        tally.write_misses_guarded += 1;
        if ctx.strict_writes {
            tally.lost += 1;
            tally.detail(format!(
                "{who}: LOST (strict writes): {render:?} answered {l:?} although replica(s) of the key stayed up and untouched since its value was set; {}",
                m.describe()
            ));
        }
    }
}

/// A request that got no reply (the connection failed before it was
/// answered): its outcome is unknown.
pub fn abandon(ctx: &Ctx, tally: &mut Tally, keys: &mut [KeyModel], op: &Op, why: &Fail) {
    tally.failures += 1;
    let mut s = String::new();
    op.render(keys, &mut s);
    let first = s.lines().next().unwrap_or("").to_string();
    let at = ctx.ms(Instant::now());
    for k in op.keys() {
        keys[k].log(at, format!("{first} -> no reply: {why}"));
        note_loss(ctx, &mut keys[k]);
    }
    unknown_outcome(keys, op, ctx.lands_until(Instant::now()));
}

/// Whether the key may be gone from every replica: none was up and
/// untouched since its value was set, or the value had a TTL that may
/// have run out. For a write whose outcome may turn out unknown.
fn note_loss(ctx: &Ctx, m: &mut KeyModel) {
    m.may_be_lost = !m
        .base_sent
        .is_some_and(|b| (ctx.live_replica)(m.primary, b))
        || m.may_expire.is_some_and(|t| Instant::now() >= t);
}

/// Sends `ops` on `conn` in one write (a pipelined batch when there are
/// several), reads and checks each reply in order. False when the
/// connection must be replaced (a reply failed or left the framing in
/// doubt; the requests after it are abandoned).
pub fn exchange(
    conn: &mut Conn,
    ctx: &Ctx,
    tally: &mut Tally,
    keys: &mut [KeyModel],
    ops: &[Op],
    deadline: Duration,
) -> bool {
    let mut req = String::new();
    for op in ops {
        op.render(keys, &mut req);
    }
    let sent = Instant::now();
    match conn.send(req.as_bytes()) {
        Ok(()) => answer_batch(conn, ctx, tally, keys, ops, sent, sent + deadline),
        Err(f) => {
            for op in ops {
                abandon(ctx, tally, keys, op, &f);
            }
            false
        }
    }
}

/// Reads the replies to `ops` (sent together at `sent`) and checks them.
/// False when the connection must be replaced.
fn answer_batch(
    conn: &mut Conn,
    ctx: &Ctx,
    tally: &mut Tally,
    keys: &mut [KeyModel],
    ops: &[Op],
    sent: Instant,
    deadline: Instant,
) -> bool {
    let mut seen: Vec<String> = Vec::new();
    for (n, op) in ops.iter().enumerate() {
        let reply = match op.shape() {
            Shape::Retrieval => conn.retrieval(deadline),
            Shape::Meta => conn.meta(deadline),
            Shape::Line => conn.line(deadline).map(Reply::Line),
        };
        let now = Instant::now();
        seen.push(format!("{reply:?}"));
        let (wrong, stale) = (tally.wrong, tally.stale);
        let fine = check(ctx, tally, keys, op, &reply, sent, now);
        if (tally.wrong, tally.stale) != (wrong, stale) && ops.len() > 1 {
            // A violation inside a pipeline: the whole batch, and the
            // replies taken so far, show whether they lined up.
            let mut batch = String::new();
            for op in ops {
                op.render(keys, &mut batch);
            }
            tally.detail(format!(
                "    in the batch {batch:?}, whose replies so far were {seen:?}"
            ));
        }
        if !fine {
            // The rest of the batch got no reply we can trust.
            for rest in &ops[n + 1..] {
                let f = Fail::Closed("an earlier reply in the pipeline failed".into());
                abandon(ctx, tally, keys, rest, &f);
            }
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(d: &str, f: u32) -> Item {
        Item {
            data: d.into(),
            flags: f,
        }
    }

    fn val(k: &str, d: &str, f: u32) -> Val {
        Val {
            key: k.into(),
            flags: f,
            data: d.into(),
            cas: None,
        }
    }

    /// Runs `steps` (op, reply) on one text key and one counter key;
    /// `live`: whether a replica counts as untouched.
    fn run(live: bool, steps: &[(Op, Result<Reply, Fail>)]) -> Tally {
        run_then(live, steps, None)
    }

    /// `run`, then one more step sent and answered `after` later.
    #[allow(clippy::type_complexity)]
    fn run_then(
        live: bool,
        steps: &[(Op, Result<Reply, Fail>)],
        last: Option<(Duration, &(Op, Result<Reply, Fail>))>,
    ) -> Tally {
        let f = move |_: usize, _: Instant| live;
        let ctx = Ctx {
            start: Instant::now(),
            client: 0,
            phase: "test",
            bound: Duration::from_secs(60),
            live_replica: &f,
            strict_writes: false,
            in_flight: Duration::ZERO,
        };
        let mut keys = vec![
            KeyModel::new("t".into(), "c0k0".into(), false, 0),
            KeyModel::new("n".into(), "c0k1".into(), true, 0),
        ];
        let mut tally = Tally::new();
        for (op, r) in steps {
            let now = Instant::now();
            check(&ctx, &mut tally, &mut keys, op, r, now, now);
        }
        if let Some((after, (op, r))) = last {
            let then = Instant::now() + after;
            check(&ctx, &mut tally, &mut keys, op, r, then, then);
        }
        tally
    }

    fn set(k: usize, d: &str, f: u32) -> Op {
        Op::Set {
            k,
            item: item(d, f),
        }
    }
    fn get(k: usize) -> Op {
        Op::Get { ks: vec![k] }
    }
    fn line(s: &str) -> Result<Reply, Fail> {
        Ok(Reply::Line(s.into()))
    }
    fn vals(v: Vec<Val>) -> Result<Reply, Fail> {
        Ok(Reply::Values(v))
    }

    /// Runs `steps` (ms from the start, op, reply) on one text key, with
    /// writes of unknown outcome in flight for `in_flight_ms`.
    fn run_timed(in_flight_ms: u64, steps: &[(u64, Op, Result<Reply, Fail>)]) -> Tally {
        let live = |_: usize, _: Instant| true;
        let start = Instant::now();
        let ctx = Ctx {
            start,
            client: 0,
            phase: "test",
            bound: Duration::from_secs(60),
            live_replica: &live,
            strict_writes: false,
            in_flight: Duration::from_millis(in_flight_ms),
        };
        let mut keys = vec![KeyModel::new("t".into(), "c0k0".into(), false, 0)];
        let mut tally = Tally::new();
        for (ms, op, r) in steps {
            let at = start + Duration::from_millis(*ms);
            check(&ctx, &mut tally, &mut keys, op, r, at, at);
        }
        tally
    }

    #[test]
    fn a_write_of_unknown_outcome_may_land_over_a_later_one_only_while_in_flight() {
        // The third write is sent at `third` ms; the read of the unknown
        // write's value last.
        let run = |in_flight_ms: u64, third: u64| {
            run_timed(
                in_flight_ms,
                &[
                    (0, set(0, "c0k0s1", 1), line("STORED")),
                    (1, set(0, "c0k0s2", 2), Err(Fail::Closed("EOF".into()))),
                    (third, set(0, "c0k0s3", 3), line("STORED")),
                    (third + 1, get(0), vals(vec![val("t", "c0k0s2", 2)])),
                ],
            )
        };
        // Nothing delays a write: the unknown one cannot land later.
        assert_eq!(run(0, 5).stale, 1);
        // Still in flight when the third was sent: it may land after it.
        let t = run(100, 5);
        assert_eq!(t.violations(), 0, "{:?}", t.details);
        // The third was sent once it could no longer be in flight.
        assert_eq!(run(100, 500).stale, 1);
    }

    #[test]
    fn a_replace_of_unknown_outcome_may_land_under_a_later_prepend_while_in_flight() {
        // Seed 20261270 on a513218: a `replace` through a member killed
        // with it on a delayed link landed after a `prepend` acknowledged
        // through another, and an `append` went on top of it.
        let replace = Op::Replace {
            k: 0,
            item: item("c0k0r2", 2),
        };
        let pend = |suffix: &str, front: bool| Op::Append {
            k: 0,
            suffix: suffix.into(),
            front,
        };
        let t = run_timed(
            100,
            &[
                (0, set(0, "c0k0s1", 1), line("STORED")),
                (1, replace, Err(Fail::Closed("EOF".into()))),
                (50, pend(".a3", true), line("STORED")),
                (60, pend(".a4", false), line("STORED")),
                (70, get(0), vals(vec![val("t", "c0k0r2.a4", 2)])),
            ],
        );
        assert_eq!(t.violations(), 0, "{:?}", t.details);
    }

    #[test]
    fn a_cas_with_a_unique_from_before_a_write_must_not_store() {
        let gets = Op::Gets { k: 0 };
        let cas = |d: &str| Op::Cas {
            k: 0,
            item: item(d, 1),
            unique: 77,
        };
        let mut hit = val("t", "c0k0s1", 1);
        hit.cas = Some(77);
        let t = run(
            true,
            &[
                (set(0, "c0k0s1", 1), line("STORED")),
                (gets.clone(), vals(vec![hit.clone()])),
                (cas("c0k0c2"), line("STORED")),
            ],
        );
        assert_eq!(t.violations(), 0, "{:?}", t.details);
        let t = run(
            true,
            &[
                (set(0, "c0k0s1", 1), line("STORED")),
                (gets, vals(vec![hit])),
                (set(0, "c0k0s3", 1), line("STORED")),
                (cas("c0k0c4"), line("STORED")),
            ],
        );
        assert_eq!(t.wrong, 1, "{:?}", t.details);
    }

    #[test]
    fn after_an_allowed_miss_an_add_of_unknown_outcome_may_have_stored() {
        let add = Op::Add {
            k: 0,
            item: item("c0k0d2", 3),
        };
        let t = run(
            false,
            &[
                (set(0, "c0k0s1", 1), line("STORED")),
                (get(0), vals(vec![])),
                (add, Err(Fail::Closed("reset".into()))),
                (get(0), vals(vec![val("t", "c0k0d2", 3)])),
            ],
        );
        assert_eq!(t.violations(), 0, "{:?}", t.details);
    }

    #[test]
    fn with_every_replica_disturbed_an_add_of_unknown_outcome_may_have_stored() {
        // No read missed first: the replicas may still have lost the key
        // (a fleet refused the add after the backup, restarted empty,
        // took it).
        let steps = |live| {
            let add = Op::Add {
                k: 0,
                item: item("c0k0d2", 3),
            };
            run(
                live,
                &[
                    (set(0, "c0k0s1", 1), line("STORED")),
                    (add, line(UNCONFIRMED)),
                    (get(0), vals(vec![val("t", "c0k0d2", 3)])),
                ],
            )
        };
        let t = steps(false);
        assert_eq!(t.violations(), 0, "{:?}", t.details);
        // With a replica up and untouched, the key was there: the add
        // could not store, and its value is stale.
        assert_eq!(steps(true).stale, 1);
    }

    #[test]
    fn once_a_ttl_may_have_run_out_an_add_of_unknown_outcome_may_have_stored() {
        let set_ttl = Op::SetTtl {
            k: 0,
            item: item("c0k0s1", 1),
            ttl: 1,
        };
        let add = Op::Add {
            k: 0,
            item: item("c0k0d2", 3),
        };
        // Every replica up and untouched: only the TTL can explain it.
        let t = run(
            true,
            &[
                (set_ttl, line("STORED")),
                (add, line(UNCONFIRMED)),
                (get(0), vals(vec![val("t", "c0k0d2", 3)])),
            ],
        );
        assert_eq!(t.violations(), 0, "{:?}", t.details);
    }

    #[test]
    fn an_autovivifying_ma_of_unknown_outcome_may_have_created_the_counter() {
        let ma = Op::MetaIncr {
            k: 0,
            delta: 6,
            init: Some(7_000_006),
        };
        let incr = Op::Incr {
            k: 0,
            delta: 6,
            down: false,
        };
        let t = run(
            true,
            &[
                (set(0, "5000000", 1), line("STORED")),
                // A delete and then the `ma`, both of unknown outcome:
                // the key may be gone, and the counter made anew.
                (Op::Delete { k: 0 }, line(UNCONFIRMED)),
                (ma, line(UNCONFIRMED)),
                (incr, line("7000012")),
            ],
        );
        assert_eq!(t.violations(), 0, "{:?}", t.details);
    }

    #[test]
    fn add_answers_follow_the_model() {
        let add = |d: &str| Op::Add {
            k: 0,
            item: item(d, 3),
        };
        let t = run(
            true,
            &[
                (add("c0k0d1"), line("STORED")),
                (get(0), vals(vec![val("t", "c0k0d1", 3)])),
                (add("c0k0d2"), line("NOT_STORED")),
                (get(0), vals(vec![val("t", "c0k0d1", 3)])),
            ],
        );
        assert_eq!(t.violations(), 0, "{:?}", t.details);
        // Refused on a key known to be absent: an old item came back.
        let t = run(true, &[(add("c0k0d1"), line("NOT_STORED"))]);
        assert_eq!(t.wrong, 1);
        // Stored over a value a live replica held: counted as a write miss.
        let t = run(
            true,
            &[
                (set(0, "c0k0s1", 1), line("STORED")),
                (add("c0k0d2"), line("STORED")),
            ],
        );
        assert_eq!(t.write_misses, 1);
    }

    #[test]
    fn latest_value_and_misses_pass() {
        let t = run(
            false,
            &[
                (set(0, "c0k0s1", 1), line("STORED")),
                (get(0), vals(vec![val("t", "c0k0s1", 1)])),
                (get(0), vals(vec![])),
                (set(1, "5000", 2), line("STORED")),
                (
                    Op::Incr {
                        k: 1,
                        delta: 3,
                        down: false,
                    },
                    line("5003"),
                ),
                (get(1), vals(vec![val("n", "5003", 2)])),
            ],
        );
        assert_eq!(t.violations(), 0, "{:?}", t.details);
        assert_eq!((t.hits, t.misses), (2, 1));
    }

    #[test]
    fn touch_0_makes_an_item_with_a_ttl_immortal() {
        // A hit long after the set's TTL: stale, unless a touch 0 came
        // between.
        let set_ttl = Op::SetTtl {
            k: 0,
            item: Item {
                data: "c0k0s1".into(),
                flags: 1,
            },
            ttl: 1,
        };
        let hit = (get(0), vals(vec![val("t", "c0k0s1", 1)]));
        let read_late = |steps: &[(Op, Result<Reply, Fail>)]| {
            run_then(false, steps, Some((Duration::from_secs(30), &hit))).stale
        };
        assert_eq!(read_late(&[(set_ttl.clone(), line("STORED"))]), 1);
        assert_eq!(
            read_late(&[
                (set_ttl, line("STORED")),
                (Op::Touch { k: 0 }, line("TOUCHED"))
            ]),
            0
        );
    }

    #[test]
    fn an_autovivifying_ma_creates_only_an_absent_counter() {
        let ma = |init| Op::MetaIncr {
            k: 1,
            delta: 3,
            init: Some(init),
        };
        let va = |n: &str| vals(vec![val("n", n, 0)]);
        let t = run(
            false,
            &[
                (ma(13), va("13")),
                (ma(13), va("16")),
                (get(1), vals(vec![val("n", "16", 0)])),
            ],
        );
        assert_eq!(t.violations(), 0, "{:?}", t.details);
        // The seeds' counter reset: an acknowledged 20 answered as created
        // is a write miss (as an `add` that stored on a held key): counted
        // against a replica that stayed up (a loss with --strict-writes),
        // allowed when a failure may have lost the counter.
        let reset = [(set(1, "20", 0), line("STORED")), (ma(13), va("13"))];
        let t = run(true, &reset);
        assert_eq!(t.write_misses_guarded, 1, "{:?}", t.details);
        let t = run(false, &reset);
        assert_eq!(
            (t.violations(), t.write_misses, t.write_misses_guarded),
            (0, 1, 0),
            "{:?}",
            t.details
        );
    }

    #[test]
    fn decr_prepend_replace_and_gats_follow_memcached() {
        let replace = |k, data: &str| Op::Replace {
            k,
            item: Item {
                data: data.into(),
                flags: 1,
            },
        };
        let t = run(
            false,
            &[
                (set(1, "10", 2), line("STORED")),
                (
                    Op::Incr {
                        k: 1,
                        delta: 7,
                        down: true,
                    },
                    line("3"),
                ),
                // memcached pads a shorter number with spaces in place.
                (get(1), vals(vec![val("n", "3 ", 2)])),
                (
                    Op::Incr {
                        k: 1,
                        delta: 7,
                        down: true,
                    },
                    line("0"),
                ),
                (replace(0, "c0k0r1"), line("NOT_STORED")),
                (set(0, "c0k0s2", 1), line("STORED")),
                (
                    Op::Append {
                        k: 0,
                        suffix: "p.".into(),
                        front: true,
                    },
                    line("STORED"),
                ),
                (get(0), vals(vec![val("t", "p.c0k0s2", 1)])),
                (replace(0, "c0k0r3"), line("STORED")),
                (
                    Op::Gat {
                        ks: vec![0],
                        ttl: 0,
                        cas: true,
                    },
                    vals(vec![val("t", "c0k0r3", 1)]),
                ),
            ],
        );
        assert_eq!(t.violations(), 0, "{:?}", t.details);
        // A replace that stores on an absent key, and a prepend served
        // from before a later replace, are caught.
        let t = run(
            false,
            &[
                (Op::Delete { k: 0 }, line("NOT_FOUND")),
                (replace(0, "c0k0r1"), line("STORED")),
            ],
        );
        assert_eq!(t.wrong, 1, "{:?}", t.details);
        let t = run(
            false,
            &[
                (set(0, "c0k0s1", 1), line("STORED")),
                (
                    Op::Append {
                        k: 0,
                        suffix: "p.".into(),
                        front: true,
                    },
                    line("STORED"),
                ),
                (replace(0, "c0k0r2"), line("STORED")),
                (get(0), vals(vec![val("t", "p.c0k0s1", 1)])),
            ],
        );
        assert_eq!(t.stale, 1, "{:?}", t.details);
    }

    #[test]
    fn an_older_value_is_stale() {
        let t = run(
            false,
            &[
                (set(0, "c0k0s1", 1), line("STORED")),
                (set(0, "c0k0s2", 2), line("STORED")),
                (get(0), vals(vec![val("t", "c0k0s1", 1)])),
            ],
        );
        assert_eq!(t.stale, 1, "{:?}", t.details);
    }

    #[test]
    fn a_value_after_an_acknowledged_delete_is_stale() {
        let t = run(
            false,
            &[
                (set(0, "c0k0s1", 1), line("STORED")),
                (Op::Delete { k: 0 }, line("DELETED")),
                (get(0), vals(vec![val("t", "c0k0s1", 1)])),
            ],
        );
        assert_eq!(t.stale, 1, "{:?}", t.details);
    }

    #[test]
    fn unknown_outcomes_are_allowed_until_the_next_ack() {
        let t = run(
            false,
            &[
                (set(0, "c0k0s1", 1), line("STORED")),
                (set(0, "c0k0s2", 2), line("SERVER_ERROR down")),
                (get(0), vals(vec![val("t", "c0k0s2", 2)])),
                (get(0), vals(vec![val("t", "c0k0s1", 1)])),
                (set(0, "c0k0s3", 3), line("STORED")),
                (get(0), vals(vec![val("t", "c0k0s2", 2)])),
            ],
        );
        assert_eq!(t.stale, 1, "{:?}", t.details);
    }

    #[test]
    fn a_miss_with_an_untouched_replica_is_lost() {
        let steps = [
            (set(0, "c0k0s1", 1), line("STORED")),
            (get(0), vals(vec![])),
        ];
        assert_eq!(run(true, &steps).lost, 1);
        assert_eq!(run(false, &steps).lost, 0);
    }

    #[test]
    fn incr_from_an_older_value_is_stale_and_flags_are_checked() {
        let t = run(
            false,
            &[
                (set(1, "1000", 1), line("STORED")),
                (set(1, "2000", 1), line("STORED")),
                (
                    Op::Incr {
                        k: 1,
                        delta: 1,
                        down: false,
                    },
                    line("1001"),
                ),
            ],
        );
        assert_eq!(t.stale, 1, "{:?}", t.details);
        let t = run(
            false,
            &[
                (set(0, "c0k0s1", 1), line("STORED")),
                (
                    Op::Append {
                        k: 0,
                        suffix: ".a2".into(),
                        front: false,
                    },
                    line("STORED"),
                ),
                (get(0), vals(vec![val("t", "c0k0s1.a2", 1)])),
                (get(0), vals(vec![val("t", "c0k0s1.a2", 9)])),
            ],
        );
        assert_eq!(t.wrong, 1, "{:?}", t.details);
    }

    #[test]
    fn a_read_error_and_an_unasked_key_are_wrong() {
        let t = run(
            false,
            &[
                (get(0), line("SERVER_ERROR x")),
                (get(0), vals(vec![val("n", "1", 0)])),
            ],
        );
        assert_eq!(t.wrong, 2, "{:?}", t.details);
    }

    #[test]
    fn a_late_reply_is_counted() {
        let f = |_: usize, _: Instant| false;
        let ctx = Ctx {
            start: Instant::now(),
            client: 0,
            phase: "test",
            bound: Duration::from_millis(10),
            live_replica: &f,
            strict_writes: false,
            in_flight: Duration::ZERO,
        };
        let mut keys = vec![KeyModel::new("t".into(), "c0k0".into(), false, 0)];
        let mut tally = Tally::new();
        let sent = Instant::now();
        let now = sent + Duration::from_millis(50);
        check(
            &ctx,
            &mut tally,
            &mut keys,
            &get(0),
            &vals(vec![]),
            sent,
            now,
        );
        assert_eq!(tally.late, 1);
    }
}
