//! Counters, and the `stats` reply built from them.
//!
//! Each worker thread owns one [`WorkerStats`] and is its only writer, so a
//! counter bump is a relaxed load and store on a cache line no other core
//! writes: no locked instruction, no contention on the hot path. Readers
//! (the `stats` command) sum every worker's counters.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::config::Tier;
use servers::ServerFigures;

pub(crate) mod fleet;
pub(crate) mod groups;
pub(crate) mod http;
pub(crate) mod metrics;
pub(crate) mod servers;

/// A counter with a single writer thread.
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the owning worker calls this, so load+store is exact.
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    #[inline]
    pub(crate) fn incr(&self) {
        self.add(1);
    }

    /// For counters that go down too (current connections).
    #[inline]
    pub(crate) fn sub(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_sub(n),
            Ordering::Relaxed,
        );
    }

    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// What request latencies are grouped by.
pub(crate) const COMMAND_CLASSES: [&str; 8] = [
    "get",
    "set",
    "delete",
    "incr_decr",
    "touch",
    "meta_get",
    "meta_write",
    "other",
];

/// The class of a command, an index into `COMMAND_CLASSES`.
pub(crate) fn command_class(c: memrelay_protocol::Command) -> usize {
    use memrelay_protocol::Command as C;
    match c {
        C::Get | C::Gets | C::Gat | C::Gats => 0,
        C::Set | C::Add | C::Replace | C::Append | C::Prepend | C::Cas => 1,
        C::Delete => 2,
        C::Incr | C::Decr => 3,
        C::Touch => 4,
        C::MetaGet | C::MetaDebug => 5,
        C::MetaSet | C::MetaDelete | C::MetaArith => 6,
        _ => 7,
    }
}

/// Upper bounds of the latency buckets, in microseconds (Prometheus `le`).
pub(crate) const LATENCY_BOUNDS_US: [u64; 14] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000,
];

thread_local! {
    /// Which worker this thread is (0 off the worker threads), for
    /// per-worker slots in shared structures (see `Health::latency`).
    static WORKER_INDEX: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Called once by each worker thread at its start.
pub(crate) fn set_worker_index(i: usize) {
    WORKER_INDEX.with(|w| w.set(i));
}

/// This thread's worker index.
#[inline]
pub(crate) fn worker_index() -> usize {
    WORKER_INDEX.with(|w| w.get())
}

/// A latency histogram with one writer (its worker): fixed buckets, no
/// locks, no allocation.
#[derive(Debug, Default)]
pub(crate) struct Histogram {
    buckets: [Counter; LATENCY_BOUNDS_US.len() + 1],
    sum_us: Counter,
}

/// A histogram's values, for summing over workers.
#[derive(Debug, Clone, Default)]
pub(crate) struct HistogramSnapshot {
    pub buckets: [u64; LATENCY_BOUNDS_US.len() + 1],
    pub sum_us: u64,
}

impl HistogramSnapshot {
    pub(crate) fn add(&mut self, other: &HistogramSnapshot) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
        self.sum_us += other.sum_us;
    }
}

impl Histogram {
    #[inline]
    pub(crate) fn record(&self, elapsed: std::time::Duration) {
        let us = elapsed.as_micros() as u64;
        let i = LATENCY_BOUNDS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.buckets[i].incr();
        self.sum_us.add(us);
    }

    pub(crate) fn snapshot(&self) -> HistogramSnapshot {
        let mut s = HistogramSnapshot::default();
        for (d, c) in s.buckets.iter_mut().zip(self.buckets.iter()) {
            *d = c.get();
        }
        s.sum_us = self.sum_us.get();
        s
    }
}

macro_rules! worker_counters {
    ($($name:ident),* $(,)?) => {
        /// One worker's counters. Names are the `stats` names.
        #[derive(Debug, Default)]
        pub(crate) struct WorkerStats {
            $(pub $name: Counter,)*
            /// Request latency per command class.
            pub latency: [Histogram; COMMAND_CLASSES.len()],
        }

        impl WorkerStats {
            /// (name, value) for every counter, in declaration order.
            pub(crate) fn each(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.get()),)*]
            }
        }
    };
}

worker_counters!(
    curr_connections,
    parked_connections,
    total_connections,
    rejected_connections,
    cmd_get,
    cmd_set,
    cmd_touch,
    cmd_delete,
    cmd_incr,
    cmd_decr,
    cmd_flush,
    get_hits,
    get_misses,
    client_errors,
    server_errors,
    replies_too_large,
    replies_over_client_buffer,
    auth_cmds,
    auth_errors,
    failovers,
    backup_hits,
    repairs,
    repairs_skipped,
    mirrors,
    mirror_failures,
    mirror_mismatches,
    bytes_read,
    bytes_written,
    memory_held,
    memory_shed,
);

/// The counters of `WorkerStats` that are gauges: they go down as well as
/// up, and `stats reset` leaves them alone.
pub(crate) const GAUGES: [&str; 3] = ["curr_connections", "parked_connections", "memory_held"];
/// What a worker counter counts, for `/metrics`' HELP lines.
pub(crate) fn help(name: &str) -> &'static str {
    match name {
        "curr_connections" => "Client connections open now.",
        "parked_connections" => {
            "Idle client connections parked now: a socket without a session task (counted in curr_connections)."
        }
        "total_connections" => "Client connections accepted since start.",
        "rejected_connections" => "Client connections refused at the -n limit.",
        "cmd_get" => "Keys requested by retrieval commands (get, gets, gat, gats, mg).",
        "cmd_set" => "Storage commands (set, add, replace, append, prepend, cas, ms).",
        "cmd_touch" => "touch commands.",
        "cmd_delete" => "delete and md commands.",
        "cmd_incr" => "incr and ma commands.",
        "cmd_decr" => "decr commands.",
        "cmd_flush" => "flush_all commands, allowed or refused.",
        "get_hits" => "Keys requested and found.",
        "get_misses" => "Keys requested and not found on any replica asked.",
        "client_errors" => "Requests answered with CLIENT_ERROR or ERROR (bad input).",
        "server_errors" => "Requests answered with SERVER_ERROR (no server could answer).",
        "replies_too_large" => "Retrievals refused for a reply over --max-reply-size.",
        "replies_over_client_buffer" => {
            "Retrievals refused because the client was owed too much (--max-client-buffer)."
        }
        "auth_cmds" => "Authentication attempts (--auth-file).",
        "auth_errors" => "Authentication attempts refused.",
        "failovers" => "Requests served by a backup because the primary was down or failed.",
        "backup_hits" => "Reads that missed on the primary and were found on a backup.",
        "repairs" => "Items copied back to a primary from a backup after a miss.",
        "repairs_skipped" => "Read repairs not done (a newer value was there, or no room).",
        "mirrors" => "Writes copied to a backup.",
        "mirror_failures" => "Writes a backup did not take (it was down or failed).",
        "mirror_mismatches" => "Writes whose backup answer differed from the primary's.",
        "bytes_read" => "Bytes read from clients.",
        "bytes_written" => "Bytes written to clients.",
        "memory_held" => "Bytes held for clients now: requests, replies and values in flight.",
        "memory_shed" => "Requests refused with SERVER_ERROR out of memory (--max-memory).",
        _ => "A memrelay counter (see the stats command of the same name).",
    }
}

/// A server as `stats` shows it: its name, its tier, and a view of its
/// state.
#[derive(Debug, Clone)]
pub(crate) struct ServerEntry {
    pub name: String,
    /// Its name in the configuration (`host:port:weight name`), if any.
    pub label: Option<String>,
    pub tier: Tier,
    pub view: Arc<dyn ServerView>,
}

/// What `stats` and `/metrics` read of one server when they render. The
/// layers that keep a server's state (its liveness, latency and own
/// figures in `backend`, its missed keys and resyncs in `ha`) implement
/// it: stats, below them, names none of their types.
pub(crate) trait ServerView: Send + Sync + std::fmt::Debug {
    fn is_down(&self) -> bool;
    /// Its counters, read now.
    fn counts(&self) -> ServerCounts;
    /// Time from queueing a request to its reply, one histogram per
    /// worker thread.
    fn latency(&self) -> &[Histogram];
    /// Its own `stats` groups, as its prober last read them.
    fn figures(&self) -> &ServerFigures;
}

/// A server's counters, as `stats` and `/metrics` show them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServerCounts {
    /// Failed connections or requests.
    pub failures: u64,
    /// Times it was marked down.
    pub marked_down: u64,
    /// Keys it must not serve until they are invalidated on it.
    pub missed_keys: u64,
    /// Whether its missed-key list overflowed (a flush is due).
    pub missed_overflowed: bool,
    pub missed_recorded: u64,
    /// Missed keys deleted on it after it came back.
    pub invalidated: u64,
    /// Flushes after the missed-key list overflowed.
    pub flushed: u64,
    pub resync: ResyncCounts,
}

/// The state of a server's current or last resync.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ResyncCounts {
    /// `idle`, `running`, `done` or `retrying`.
    pub state: &'static str,
    pub running: bool,
    pub runs: u64,
    pub scanned: u64,
    pub selected: u64,
    pub copied: u64,
    pub skipped: u64,
    pub errors: u64,
    /// Items per second.
    pub rate: u64,
    /// Seconds left, estimated.
    pub eta: u64,
}

/// Process-wide facts and every worker's counters.
#[derive(Debug)]
pub(crate) struct StatsRegistry {
    pub started: Instant,
    pub threads: usize,
    /// `-n`, which a reload may change.
    pub max_conns: AtomicUsize,
    pub workers: Vec<Arc<WorkerStats>>,
    /// Primaries then backups, as configured now: a reload replaces the
    /// list (read by `stats` and `/metrics`, never on the request path).
    servers: RwLock<Arc<[ServerEntry]>>,
    /// Configurations reloaded, and reloads refused (the running one kept).
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
    /// The counters' sums (in `WorkerStats::each` order) at the last
    /// `stats reset`: the `stats` reply shows what was counted since, as
    /// memcached's does, while the counters themselves never go back (a
    /// client must not be able to hide, say, failed authentications from
    /// Prometheus, whose counters only grow).
    since_reset: std::sync::Mutex<Vec<u64>>,
    /// What `stats settings` and `stats conns` show of the running
    /// configuration (replaced at each reload).
    shown: RwLock<Arc<Shown>>,
    /// The fleet's figures, with `--peer-listen` (set once at start).
    pub fleet: std::sync::OnceLock<Arc<fleet::FleetFigures>>,
}

/// The running configuration as the `stats` groups show it.
#[derive(Debug, Default)]
struct Shown {
    settings: Vec<(String, String)>,
    /// The listeners, as memcached names them (`tcp:127.0.0.1:11211`).
    listen: Vec<String>,
}

impl StatsRegistry {
    pub(crate) fn new(
        threads: usize,
        max_conns: usize,
        servers: Vec<ServerEntry>,
    ) -> StatsRegistry {
        StatsRegistry {
            started: Instant::now(),
            threads,
            max_conns: AtomicUsize::new(max_conns),
            workers: (0..threads)
                .map(|_| Arc::new(WorkerStats::default()))
                .collect(),
            servers: RwLock::new(servers.into()),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            since_reset: std::sync::Mutex::default(),
            shown: RwLock::new(Arc::default()),
            fleet: std::sync::OnceLock::new(),
        }
    }

    /// The configuration is (now) `cfg`: what `stats settings` shows.
    pub(crate) fn set_config(&self, cfg: &crate::config::Config) {
        let listen = cfg
            .listen
            .iter()
            .map(|l| match l {
                crate::config::Listen::Tcp(a) if a.is_ipv6() => format!("tcp6:{a}"),
                crate::config::Listen::Tcp(a) => format!("tcp:{a}"),
                crate::config::Listen::Unix { path, .. } => format!("unix:{}", path.display()),
            })
            .collect();
        let shown = Shown {
            settings: groups::settings(cfg),
            listen,
        };
        *self.shown.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(shown);
    }

    fn shown(&self) -> Arc<Shown> {
        self.shown.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `stats settings`, but for `maxbytes`, which the servers tell.
    pub(crate) fn settings(&self) -> Vec<(String, String)> {
        self.shown().settings.clone()
    }

    /// The listeners, as `stats conns` names them.
    pub(crate) fn settings_listen(&self) -> Vec<String> {
        self.shown().listen.clone()
    }

    /// A figure of the servers' own `stats`, summed over the primaries that
    /// can be reached (each key has one primary: this is the cache as its
    /// clients see it).
    pub(crate) fn primaries_sum(&self, name: &str) -> u64 {
        self.servers()
            .iter()
            .filter(|s| s.tier == Tier::Primary)
            .filter_map(|s| s.view.figures().number(name))
            .sum()
    }

    /// The servers as configured now.
    pub(crate) fn servers(&self) -> Arc<[ServerEntry]> {
        // A panic while the lock was held cannot leave a half-written list
        // (the write is one assignment).
        self.servers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A reload changed the servers.
    pub(crate) fn set_servers(&self, servers: Vec<ServerEntry>) {
        *self.servers.write().unwrap_or_else(|p| p.into_inner()) = servers.into();
    }

    /// Why not every key can be served now, if so: a primary that is down
    /// with no backup up.
    pub(crate) fn unready(&self) -> Option<String> {
        let servers = self.servers();
        let backup_up = servers
            .iter()
            .any(|s| s.tier != Tier::Primary && !s.view.is_down());
        servers
            .iter()
            .find(|s| s.tier == Tier::Primary && s.view.is_down() && !backup_up)
            .map(|s| format!("primary {} is down and no backup is up", s.name))
    }

    /// Every counter summed over the workers, in `WorkerStats::each` order.
    fn sums(&self) -> Vec<(&'static str, u64)> {
        let mut sums: Vec<(&'static str, u64)> = Vec::new();
        for w in &self.workers {
            for (i, (name, v)) in w.each().into_iter().enumerate() {
                match sums.get_mut(i) {
                    Some(s) => s.1 = s.1.wrapping_add(v),
                    None => sums.push((name, v)),
                }
            }
        }
        sums
    }

    /// `stats reset`: the `stats` reply's totals start again from zero (not
    /// its gauges); the counters, and what `/metrics` shows, go on.
    pub(crate) fn reset(&self) {
        let now = self.sums().into_iter().map(|(_, v)| v).collect();
        *self.since_reset.lock().unwrap_or_else(|p| p.into_inner()) = now;
    }

    /// The body of the general `stats` reply: `STAT name value` lines then `END`.
    pub(crate) fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2048);
        let mut stat = |name: &str, value: &dyn std::fmt::Display| {
            out.extend_from_slice(format!("STAT {name} {value}\r\n").as_bytes());
        };
        let now_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        stat("pid", &std::process::id());
        stat("uptime", &self.started.elapsed().as_secs());
        stat("time", &now_unix);
        stat("version", &crate::VERSION);
        stat("proxy", &"memrelay");
        stat("threads", &self.threads);
        stat("max_connections", &self.max_conns.load(Ordering::Relaxed));
        stat("allocations", &crate::alloc::allocations());
        let baseline = self
            .since_reset
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (i, (name, v)) in self.sums().into_iter().enumerate() {
            let since = match baseline.get(i) {
                Some(b) if !GAUGES.contains(&name) => v.saturating_sub(*b),
                _ => v,
            };
            stat(name, &since);
        }
        for name in servers::CAPACITY {
            stat(name, &self.primaries_sum(name));
        }
        stat("reloads", &self.reloads.load(Ordering::Relaxed));
        stat(
            "reload_failures",
            &self.reload_failures.load(Ordering::Relaxed),
        );
        if let Some(f) = self.fleet.get() {
            f.stats(&mut stat);
        }
        let servers = self.servers();
        stat("servers", &servers.len());
        for (i, server) in servers.iter().enumerate() {
            server_stats(&mut stat, i, server);
        }
        // The closure's borrow of `out` ends at its last use above.
        out.extend_from_slice(b"END\r\n");
        out
    }
}

/// The `server:<i>:...` lines of the general `stats` reply for one server.
fn server_stats(
    stat: &mut dyn FnMut(&str, &dyn std::fmt::Display),
    i: usize,
    server: &ServerEntry,
) {
    let h = &server.view;
    let c = h.counts();
    let state = if h.is_down() { "down" } else { "up" };
    stat(&format!("server:{i}:address"), &server.name);
    if let Some(label) = &server.label {
        stat(&format!("server:{i}:name"), label);
    }
    stat(&format!("server:{i}:role"), &server.tier);
    stat(&format!("server:{i}:state"), &state);
    stat(&format!("server:{i}:failures"), &c.failures);
    stat(&format!("server:{i}:marked_down"), &c.marked_down);
    stat(&format!("server:{i}:missed_keys"), &c.missed_keys);
    stat(
        &format!("server:{i}:missed_overflowed"),
        &u8::from(c.missed_overflowed),
    );
    stat(&format!("server:{i}:missed_recorded"), &c.missed_recorded);
    stat(&format!("server:{i}:invalidated"), &c.invalidated);
    stat(&format!("server:{i}:flushed"), &c.flushed);
    for name in servers::CAPACITY {
        if let Some(v) = h.figures().number(name) {
            stat(&format!("server:{i}:{name}"), &v);
        }
    }
    let r = &c.resync;
    stat(&format!("server:{i}:resync_state"), &r.state);
    for (name, v) in [
        ("runs", r.runs),
        ("scanned", r.scanned),
        ("selected", r.selected),
        ("copied", r.copied),
        ("skipped", r.skipped),
        ("errors", r.errors),
        ("rate", r.rate),
        ("eta", r.eta),
    ] {
        stat(&format!("server:{i}:resync_{name}"), &v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_further_backup_tier_keeps_the_proxy_ready() {
        #[derive(Debug, Default)]
        struct Server {
            down: bool,
            figures: ServerFigures,
        }
        impl ServerView for Server {
            fn is_down(&self) -> bool {
                self.down
            }
            fn counts(&self) -> ServerCounts {
                ServerCounts::default()
            }
            fn latency(&self) -> &[Histogram] {
                &[]
            }
            fn figures(&self) -> &ServerFigures {
                &self.figures
            }
        }
        let server = |name: &str, tier: Tier, down: bool| ServerEntry {
            name: name.to_string(),
            label: None,
            tier,
            view: Arc::new(Server {
                down,
                ..Default::default()
            }),
        };
        let r = StatsRegistry::new(
            1,
            16,
            vec![
                server("p", Tier::Primary, true),
                server("b", Tier::Backup(1), true),
                server("b2", Tier::Backup(2), false),
            ],
        );
        assert_eq!(r.unready(), None);
        r.set_servers(vec![
            server("p", Tier::Primary, true),
            server("b", Tier::Backup(1), true),
        ]);
        assert!(r.unready().is_some());
    }
}
