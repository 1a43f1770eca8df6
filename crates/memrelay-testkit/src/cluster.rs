//! A cluster: memcached primaries and backups, and one memrelay in front
//! of them, each on a loopback port the kit picks; every process stopped
//! when the cluster is dropped.
//!
//! ```no_run
//! use memrelay_testkit::Cluster;
//! let mut cl = Cluster::builder().primaries(2).flags(&["-t", "4"]).start();
//! cl.primaries[0].kill();
//! ```
//!
//! Where a key lives is memrelay's business: a test that needs it asks
//! memrelay's router (the tests link memrelay), or stores keys and looks
//! on the servers ([`set_spread`]), as memrelay-chaos does.

use std::time::Duration;

use crate::client::{stats, Client};
use crate::memcached::Memcached;
use crate::memrelay::Memrelay;
use crate::process::wait_until;
use crate::wire::{complete_retrieval, escape};

/// memrelay flags every cluster starts with, before the caller's own (a
/// later flag overrides an earlier one): a server that fails is noticed
/// within 300 ms, so failover tests run in seconds; two workers, so a
/// client's requests and the background work they start can cross
/// threads.
pub const HA_FLAGS: [&str; 6] = [
    "--timeout",
    "300ms",
    "--connect-timeout",
    "300ms",
    "-t",
    "2",
];

/// How long background work may take to become visible (mirrors,
/// repairs, marking a server up or down).
pub const CONVERGE: Duration = Duration::from_secs(5);

/// What `Cluster::builder` starts.
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    primaries: usize,
    backups: usize,
    /// memrelay flags after the server list and `HA_FLAGS`.
    flags: Vec<String>,
}

impl ClusterBuilder {
    /// How many primaries (`-s`); 1 by default.
    pub fn primaries(mut self, n: usize) -> ClusterBuilder {
        self.primaries = n;
        self
    }

    /// How many backups (`-b`); 1 by default.
    pub fn backups(mut self, n: usize) -> ClusterBuilder {
        self.backups = n;
        self
    }

    /// More memrelay flags (after `HA_FLAGS`, so they override them).
    pub fn flags<S: AsRef<str>>(mut self, flags: &[S]) -> ClusterBuilder {
        self.flags
            .extend(flags.iter().map(|f| f.as_ref().to_string()));
        self
    }

    pub fn start(self) -> Cluster {
        let primaries: Vec<Memcached> = (0..self.primaries).map(|_| Memcached::start()).collect();
        let backups: Vec<Memcached> = (0..self.backups).map(|_| Memcached::start()).collect();
        let mut args = server_args(&primaries, &backups);
        args.extend(HA_FLAGS.iter().map(|f| f.to_string()));
        args.extend(self.flags);
        let relay = Memrelay::start(&args);
        Cluster {
            primaries,
            backups,
            relay,
            args,
        }
    }
}

/// `-s` for each primary, then `-b` for each backup, in order: memrelay
/// numbers its servers this way (`server:<i>:...` in `stats`).
fn server_args(primaries: &[Memcached], backups: &[Memcached]) -> Vec<String> {
    let mut a = Vec::new();
    for p in primaries {
        a.extend(["-s".to_string(), p.addr()]);
    }
    for b in backups {
        a.extend(["-b".to_string(), b.addr()]);
    }
    a
}

#[derive(Debug)]
pub struct Cluster {
    pub primaries: Vec<Memcached>,
    pub backups: Vec<Memcached>,
    pub relay: Memrelay,
    /// memrelay's arguments after `-l/-p` (to start a second proxy the
    /// same way).
    pub args: Vec<String>,
}

impl Cluster {
    /// One primary, one backup, `HA_FLAGS`; change them, then `start`.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            primaries: 1,
            backups: 1,
            flags: Vec::new(),
        }
    }

    /// The `-s`/`-b` arguments alone (for a router built the same way).
    pub fn server_args(&self) -> Vec<String> {
        server_args(&self.primaries, &self.backups)
    }

    /// Server `index` as memrelay numbers them: primaries, then backups.
    pub fn server(&mut self, index: usize) -> &mut Memcached {
        let np = self.primaries.len();
        if index < np {
            &mut self.primaries[index]
        } else {
            &mut self.backups[index - np]
        }
    }

    /// A client of the proxy with a 5 s deadline per exchange (longer than
    /// any failover, so a slow answer is seen, not cut off).
    pub fn client(&self) -> Client {
        let mut c = self.relay.client();
        c.set_deadline(Duration::from_secs(5));
        c
    }

    /// The proxy's recent output, and whether it exited, for a failure
    /// message.
    pub fn diag(&mut self) -> String {
        let exited = match self.relay.exited() {
            Some(st) => format!("memrelay EXITED: {st}\n"),
            None => String::new(),
        };
        let out = self.relay.output();
        let tail = match out.char_indices().rev().nth(2999) {
            Some((i, _)) => out[i..].to_string(),
            None => out,
        };
        format!("{exited}memrelay output (tail):\n{tail}")
    }

    /// Waits until the proxy's `stats` says server `index` (primaries then
    /// backups) is `state`, calling `nudge` between polls (a server is
    /// marked down only by requests that fail, so tests send some).
    /// Fails the test after `CONVERGE`.
    pub fn wait_state(&mut self, index: usize, state: &str, mut nudge: impl FnMut(&Cluster)) {
        let name = format!("server:{index}:state");
        let mut last = String::new();
        let ok = wait_until(CONVERGE, || {
            nudge(self);
            last = stats(&self.relay.addr())
                .get(&name)
                .cloned()
                .unwrap_or_default();
            last == state
        });
        if !ok {
            let d = self.diag();
            panic!("{name} never became {state} within {CONVERGE:?} (last: {last:?})\n{d}");
        }
    }
}

/// Keys that land on every one of `servers` (checked on the servers
/// themselves after a set through the proxy).
pub fn set_spread(proxy: &str, servers: &[&Memcached], n: usize) -> Vec<String> {
    let mut c = Client::with_sentinel(proxy);
    let mut keys = Vec::new();
    for i in 0..n {
        let key = format!("spread-{i}");
        let r = c.exchange(format!("set {key} 0 0 1\r\nx\r\n").as_bytes());
        assert_eq!(r.bytes, b"STORED\r\n", "set {key}: {}", escape(&r.bytes));
        keys.push(key);
    }
    for s in servers {
        let mut direct = s.client();
        let held = keys.iter().any(|k| {
            direct
                .send_until(format!("get {k}\r\n").as_bytes(), complete_retrieval)
                .bytes
                .starts_with(b"VALUE")
        });
        assert!(held, "no key of {n} went to {}", s.addr());
    }
    keys
}
