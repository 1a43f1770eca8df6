//! A fleet: several memrelays, configured alike, behind one VIP. Each tells
//! the others of every key a server missed (a *hint*), so that a key
//! written past a server through one memrelay is not read stale from that
//! server through another (docs/ha.md, "A fleet of memrelays").
//!
//! What peers exchange merges by union and is safe to apply twice: a hint
//! learnt is the same record a local write would have made (the key is
//! bypassed on that server until the learner's prober deletes it there), and
//! a needless one costs one miss. So there is no leader, no log and no
//! consensus:
//!
//! - a hint goes to every peer reached, and the write that caused it is
//!   answered once they took it or `--peer-timeout` passed (a peer that did
//!   not answer in time is counted down, and skipped, until reached again);
//! - a peer reached again (or for the first time) is first sent every key
//!   each server's list holds, before any new hint: what it missed while
//!   apart is carried by the union;
//! - each peer connection is dialled by the side that sends on it, so each
//!   pair of memrelays has two, one each way.
//!
//! A worker thread does not send a hint at once: it keeps the hints its
//! writes make and hands them all to a sender thread of its own before it
//! next writes to any client ([`flush_hints`]); a reply whose request made
//! hints leaves only once they are answered, so no reply leaves before the
//! peers have what it depends on, a pipeline of writes past a server costs
//! one round trip to the peers, not one per write, and the worker's other
//! clients do not wait for the peers (`outbox`). Other threads (probers,
//! resyncs) send each hint at once. A fleet costs nothing while no server
//! misses a write.
//!
//! The blocking sockets and threads here follow `ha::persist`'s hand-off
//! records: a handful of connections that carry a few lines during failure
//! episodes only.

pub(crate) mod epoch;
mod link;
mod listen;
mod outbox;
mod wire;

pub(crate) use outbox::{
    confirmed, defer_hints_on_this_thread, flush_hints, hints_answered, hints_made, HintAnswers,
};

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};

use crate::config::fleet::Fleet as FleetConfig;
use crate::ha::missed::Source;
use crate::ha::replica::Replica;
use crate::stats::fleet::FleetFigures;

/// The record a hint carries, to be told once a peer took the hint
/// (`MissedKeys::shared`).
pub(super) struct Share {
    replica: Weak<Replica>,
    key: Box<[u8]>,
    gen: u64,
}

/// Tells the lists of `shares` whether a peer took their hints. Before
/// the writes are answered: a record no peer took makes the state file say
/// its server is `dirty` (`ha::persist`).
fn note_shares(shares: &[Share], taken: bool) {
    for s in shares {
        if let Some(r) = s.replica.upgrade() {
            if taken {
                r.missed.shared(&s.key, s.gen);
            } else {
                r.missed.untaken(&s.key, s.gen);
            }
        }
    }
}

/// Appends the `hint` lines for what `server`'s list holds (`None`:
/// overflowed, every key).
fn push_hints(out: &mut Vec<u8>, server: &str, keys: Option<&[Box<[u8]>]>) {
    match keys {
        None => out.extend_from_slice(&wire::hint(server, None, false)),
        Some(keys) => {
            for k in keys {
                // What a list holds is past: a write given up on when it
                // was recorded was told as held at the time.
                out.extend_from_slice(&wire::hint(server, Some(k), false));
            }
        }
    }
}

/// What a server's list holds: its keys, or None when it overflowed (the
/// server missed every key).
type Listed = Option<Vec<Box<[u8]>>>;

/// Where one server's list stood when a peer was sent the lists
/// (`Fleet::marks`).
#[derive(Debug)]
pub(super) struct Mark {
    server: String,
    gen: u64,
    overflowed: bool,
}

/// This memrelay's part in a fleet.
#[derive(Debug)]
pub(crate) struct Fleet {
    cfg: FleetConfig,
    /// Random per process: a connection from a process with the same id is
    /// this process dialling itself.
    instance: String,
    /// One per peer, in `cfg.peers` order.
    links: Vec<link::Link>,
    /// Each server by the name the fleet knows it by (its twemproxy name,
    /// else `host:port`), for the hints peers send.
    servers: Mutex<HashMap<String, Weak<Replica>>>,
    figures: Arc<FleetFigures>,
    /// Whether this process still takes peers' connections (a hand-off
    /// gives the port to the new process).
    listening: std::sync::atomic::AtomicBool,
    /// Each peer as `join` waits for it.
    joining: (Mutex<Vec<Joining>>, std::sync::Condvar),
    /// Servers a peer said it lost its list for in a crash (`forgot`).
    forgot_by_peers: Mutex<std::collections::HashSet<String>>,
    /// This member's stage in a fleet reload, as its peers are told it
    /// (None until `topology` sets it).
    stage: Mutex<Option<epoch::Stage>>,
    /// What each peer last said of its own, in `cfg.peers` order (None:
    /// not heard from since this process started).
    heard: Mutex<Vec<Option<epoch::Stage>>>,
    /// The routings this member serves and records by, as lines
    /// (`config::routing`), for peers that ask (`routing`).
    routings: Mutex<String>,
    /// The routings peers gave, by the same lines (the last of each).
    learnt_routings: Mutex<HashMap<u64, Arc<str>>>,
    /// Hints naming a server this member does not have, received while
    /// the fleet seemed to route alike (the warning comes once, at
    /// `UNKNOWN_BEFORE_WARNING`).
    unknown_while_alike: std::sync::atomic::AtomicU64,
    /// What peers said before this member's link reached them (`early`).
    early: Mutex<HashMap<String, Early>>,
}

/// What a peer's process said on its connection to this one before this
/// member's link to it reached it (so before it could be told which link
/// it is, when it listens elsewhere than where it is reached).
#[derive(Debug, Default)]
struct Early {
    connected: bool,
    stage: Option<epoch::Stage>,
    /// Where it said it listens.
    listen: Option<std::net::SocketAddr>,
}

/// Where a starting memrelay stands with one peer.
#[derive(Debug, Default, Clone, Copy)]
struct Joining {
    /// Dialled once (reached or not).
    tried: bool,
    /// Reached: it gave its lists and took this one's.
    reached: bool,
    /// It connected to this memrelay (so its hints reach it).
    connected: bool,
}

impl Joining {
    /// Nothing more to wait for: a peer not reached is not waited for;
    /// one reached is, until it has connected back.
    fn done(self) -> bool {
        self.tried && (!self.reached || self.connected)
    }

    /// Reached, and connected back: its lists are learnt.
    fn heard(self) -> bool {
        self.reached && self.connected
    }
}

/// Hints naming an unknown server, while the fleet routes alike, before
/// the warning: more than a reload's race, fewer than a misconfigured
/// fleet sends in a moment.
const UNKNOWN_BEFORE_WARNING: u64 = 100;

/// Most routings kept from peers' answers (`learn_routings`).
const MAX_LEARNT_ROUTINGS: usize = 8;

/// Longest a starting memrelay waits for its peers' lists before it
/// serves (a peer that does not answer costs this once; after a crash
/// that left servers only the whole fleet can vouch for, a peer not
/// reached at the first try gets this once more: `join`).
const JOIN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// After a crash, how long a server the fleet could not vouch for while
/// this memrelay joined serves nothing, waiting for every peer to be
/// reached, before it is flushed instead (`ha::persist::Persist::settle`).
pub(crate) const VOUCH_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Fleet {
    /// Starts listening for the peers and dialling them.
    pub(crate) fn start(
        cfg: &FleetConfig,
        figures: &std::sync::OnceLock<Arc<FleetFigures>>,
    ) -> Arc<Fleet> {
        let figures = figures
            .get_or_init(|| Arc::new(FleetFigures::new(cfg.peers.iter().map(|(n, _)| n.clone()))))
            .clone();
        let fleet = Arc::new(Fleet {
            cfg: cfg.clone(),
            instance: wire::nonce(),
            links: cfg
                .peers
                .iter()
                .enumerate()
                .map(|(i, (_, addr))| link::Link::new(i, *addr))
                .collect(),
            servers: Mutex::new(HashMap::new()),
            figures,
            listening: std::sync::atomic::AtomicBool::new(true),
            joining: (
                Mutex::new(vec![Joining::default(); cfg.peers.len()]),
                std::sync::Condvar::new(),
            ),
            forgot_by_peers: Mutex::new(std::collections::HashSet::new()),
            stage: Mutex::new(None),
            heard: Mutex::new(vec![None; cfg.peers.len()]),
            routings: Mutex::new(String::new()),
            learnt_routings: Mutex::new(HashMap::new()),
            unknown_while_alike: std::sync::atomic::AtomicU64::new(0),
            early: Mutex::new(HashMap::new()),
        });
        listen::start(&fleet);
        tracing::info!(listen = %cfg.listen, peers = cfg.peers.len(), "fleet: telling peers of missed keys");
        fleet
    }

    /// Dials every peer (from then on, for good) and waits, at most
    /// `JOIN_WAIT`, until each was tried once and each reached has
    /// connected back: what the reachable ones list is learnt, and their
    /// hints reach this process, before it serves. Call it once every
    /// server is watched.
    ///
    /// `vouching`: this process starts after a crash, and what it knew of
    /// some server only the whole fleet can say again (`vouches`), or it
    /// holds that server (`ha::persist::Persist::settle`). Then a peer not
    /// reached at the first try is dialled again for up to `JOIN_WAIT`
    /// more: a link down for a moment (a chaos run saw a reset of 1.5 s)
    /// costs that wait rather than a server that serves nothing here.
    pub(crate) fn join(self: &Arc<Self>, vouching: bool) {
        for i in 0..self.links.len() {
            link::keep(self, i);
        }
        let (lock, cv) = &self.joining;
        let mut deadline = std::time::Instant::now() + JOIN_WAIT;
        let mut told = false;
        let mut tried = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let all_tried = tried.iter().all(|j| j.done());
            if all_tried && (!vouching || self.every_peer(&tried, Joining::heard)) {
                return;
            }
            if all_tried && !told {
                // The first try may itself take a dial's wait (a peer that
                // takes the connection and does not answer): the tries
                // again get a whole `JOIN_WAIT`.
                told = true;
                deadline = std::time::Instant::now() + JOIN_WAIT;
                tracing::info!(wait = ?JOIN_WAIT, "fleet: after a crash: a peer not reached yet is dialled again, as only the whole fleet can say again what this process knew");
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                tracing::warn!("fleet: serving before every peer was reached: one that is not may know keys a server missed");
                return;
            }
            tried = cv
                .wait_timeout(tried, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Peer `i` was dialled once more (and `reached`, or not).
    fn tried(&self, i: usize, reached: bool) {
        let (lock, cv) = &self.joining;
        let mut joining = lock.lock().unwrap_or_else(|p| p.into_inner());
        let j = &mut joining[i];
        if !j.tried {
            j.tried = true;
            j.reached = reached;
            cv.notify_all();
        } else if reached && !j.reached {
            // Reached at a later try (`join`, when vouching, waits for it).
            j.reached = true;
            cv.notify_all();
        }
    }

    /// A peer's process proved the secret on a connection to this one,
    /// saying it listens on `listen`: if this one's link to it reaches
    /// an older process (a restart) or none, it is dialled now, so this
    /// memrelay's hints reach it from its first request on.
    fn peer_dialled(&self, listen: std::net::SocketAddr, instance: &str) {
        if let Some(l) = self.links.iter().find(|l| l.listens_on(listen)) {
            l.peer_is(instance);
        }
    }

    /// The link whose process `instance` this member's link reached, or
    /// to the peer that listens on `listen` (as it says): members may
    /// reach each other at other addresses than the ones they listen on
    /// (a NAT, a wildcard `--peer-listen`, a forwarder).
    fn link_of(&self, listen: std::net::SocketAddr, instance: &str) -> Option<usize> {
        if let Some(i) = self.links.iter().position(|l| l.reaches(instance)) {
            // Remembered: the peer's next process (a restart, a hand-off)
            // announces the same, and is dialled back at once by it
            // (`peer_dialled`). A wildcard names no one peer.
            if !listen.ip().is_unspecified() {
                self.links[i].heard_listen(listen);
            }
            return Some(i);
        }
        self.links.iter().position(|l| l.listens_on(listen))
    }

    /// What a peer said on its connection before this member's link
    /// reached it, by process, kept until the link does (`matched`).
    fn early(&self, instance: &str, f: impl FnOnce(&mut Early)) {
        let mut early = self.early.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: only authenticated peers get here, a few per member.
        if early.len() >= 64 && !early.contains_key(instance) {
            early.clear();
        }
        f(early.entry(instance.to_string()).or_default());
    }

    /// Link `i` reached process `instance`: what it said before counts.
    fn matched(&self, i: usize, instance: &str) {
        let said = self
            .early
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(instance);
        if let Some(e) = said {
            if let Some(listen) = e.listen.filter(|l| !l.ip().is_unspecified()) {
                self.links[i].heard_listen(listen);
            }
            if let Some(stage) = e.stage {
                self.heard_from(i, stage);
            }
            if e.connected {
                self.connected(i);
            }
        }
    }

    /// A peer's connection to this process is set up (`joined`): every
    /// hint it makes from now on comes here.
    fn peer_connected(&self, listen: std::net::SocketAddr, instance: &str) {
        match self.link_of(listen, instance) {
            Some(i) => self.connected(i),
            None => self.early(instance, |e| {
                e.connected = true;
                e.listen = Some(listen);
            }),
        }
    }

    fn connected(&self, i: usize) {
        let (lock, cv) = &self.joining;
        lock.lock().unwrap_or_else(|p| p.into_inner())[i].connected = true;
        cv.notify_all();
    }

    /// Tells the peers of every key `replica`'s server misses from now on,
    /// and takes their hints for it, under `name` (the server's twemproxy
    /// name, else its address: what every member calls it).
    pub(crate) fn watch(self: &Arc<Self>, name: &str, replica: &Arc<Replica>) {
        self.servers_map()
            .insert(name.to_string(), Arc::downgrade(replica));
        let me = Arc::downgrade(self);
        let name = name.to_string();
        let list = Arc::downgrade(replica);
        replica.missed.track_shares();
        replica
            .missed
            .on_record(Box::new(move |key, from, gen, given_up| {
                // What a peer or the hand-off's other process recorded was
                // sent to the peers by the process that recorded it.
                if from != Source::Here {
                    return;
                }
                let share = key.filter(|_| gen != 0).map(|k| Share {
                    replica: list.clone(),
                    key: k.into(),
                    gen,
                });
                // A write given up on may still land: the peers keep the key
                // until the server has had time to apply it (`settle::Held`).
                // They may have seen no failure at all: this process's link
                // to the server may be the slow one.
                if let Some(me) = me.upgrade() {
                    me.hint(&me, &name, key, share, given_up);
                }
            }));
    }

    /// Where each server's list stands now, for `known_since`: taken
    /// before `known`, so a record made in between is in both.
    fn marks(&self) -> Vec<Mark> {
        self.servers_map()
            .iter()
            .filter_map(|(name, r)| {
                let r = r.upgrade()?;
                Some(Mark {
                    server: name.clone(),
                    gen: r.missed.mark(),
                    overflowed: r.missed.is_overflowed(),
                })
            })
            .collect()
    }

    /// What `known` would add to what it said at `marks`: the keys
    /// recorded since, and "every key" for a list that overflowed since
    /// (sent twice, it would make a peer flush a server twice). A server
    /// without a mark is given whole: `known` is this with no marks.
    fn known_since(&self, marks: &[Mark]) -> Vec<(String, Listed)> {
        self.servers_map()
            .iter()
            .filter_map(|(name, r)| {
                let r = r.upgrade()?;
                if r.missed.is_empty() {
                    return None;
                }
                let mark = marks.iter().find(|m| &m.server == name);
                if r.missed.is_overflowed() {
                    // An overflow from the hand-off partner is not
                    // shared at all: see `known`.
                    let shared = r.missed.overflowed_by() != Some(Source::Handoff);
                    let told = mark.is_some_and(|m| m.overflowed);
                    return (shared && !told).then(|| (name.clone(), None));
                }
                let keys = match mark {
                    Some(m) => r.missed.snapshot_since(m.gen),
                    None => r.missed.snapshot(),
                };
                (!keys.is_empty()).then(|| (name.clone(), Some(keys)))
            })
            .collect()
    }

    fn servers_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Weak<Replica>>> {
        self.servers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every server's missed keys now, by fleet name (`None`: every key),
    /// for a peer reached again and a starting one (`sync`).
    ///
    /// A list that overflowed because this process started after a crash
    /// (its state file said the server was dirty) is not shared: it means
    /// "this process forgot which keys", and what it had recorded reached
    /// the peers as hints before the writes were answered. Shared, it
    /// would make every member flush the server.
    fn known(&self) -> Vec<(String, Listed)> {
        self.known_since(&[])
    }

    /// The servers whose lists this process does not have (overflowed
    /// from its state file after a crash, or from its hand-off partner:
    /// flushed before it serves them, and not shared, see `known`; or
    /// held after a crash until the fleet vouches for them), for a
    /// peer that starts after a crash of its own and must not take this
    /// process's silence about them for "nothing missed" (`vouches`).
    fn forgotten(&self) -> Vec<String> {
        self.servers_map()
            .iter()
            .filter(|(_, r)| {
                r.upgrade().is_some_and(|r| {
                    r.missed.overflowed_by() == Some(Source::Handoff) || r.missed.is_unvouched()
                })
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Whether a peer said it lost its own list for `server` in a crash
    /// (then the fleet can never vouch for it: `vouches`).
    pub(crate) fn peer_forgot_list(&self, server: &str) -> bool {
        self.forgot_by_peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(server)
    }

    fn peer_forgot(&self, server: &str) {
        self.forgot_by_peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(server.to_string());
    }

    /// Whether the fleet's lists, as learnt while joining, can stand for
    /// what this process knew of `server` before it crashed, when all it
    /// knew came from peers (`ha::persist`, `learnt`): every peer was
    /// reached and gave its lists, and none lost its own list for that
    /// server in a crash. Call it after `join`.
    pub(crate) fn vouches(&self, server: &str) -> bool {
        let (lock, _) = &self.joining;
        let joining = lock.lock().unwrap_or_else(|p| p.into_inner());
        self.every_peer(&joining, |j| j.reached) && !self.peer_forgot_list(server)
    }

    /// Whether `ok` holds for every peer but this process itself.
    fn every_peer(&self, joining: &[Joining], ok: impl Fn(Joining) -> bool) -> bool {
        joining
            .iter()
            .zip(&self.links)
            .all(|(j, l)| ok(*j) || l.myself.load(Ordering::Relaxed))
    }

    /// Tells the peers this member's stage now (their keepers send it at
    /// once, and with every ping after), and the routings it serves and
    /// records by, for those that ask (lines: `Config::routing_lines`).
    pub(crate) fn show(&self, stage: epoch::Stage, routings: String) {
        *self.routings.lock().unwrap_or_else(|p| p.into_inner()) = routings;
        let changed = self
            .stage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(stage)
            != Some(stage);
        if changed {
            self.figures.stage.store(stage.number(), Ordering::Relaxed);
            for l in &self.links {
                l.kick();
            }
        }
    }

    fn routings(&self) -> String {
        self.routings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Keeps the routings a peer gave, by fingerprint: one copy of its
    /// answer, shared by the routings in it, and at most
    /// `MAX_LEARNT_ROUTINGS` of them (a member needs two).
    fn learn_routings(&self, lines: &str) {
        let shared: Arc<str> = Arc::from(lines);
        let mut learnt = self
            .learnt_routings
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for line in lines.lines().filter(|l| l.starts_with("route ")) {
            let fp = line
                .split(' ')
                .nth(1)
                .and_then(|f| u64::from_str_radix(f, 16).ok());
            if let Some(fp) = fp {
                if learnt.len() >= MAX_LEARNT_ROUTINGS && !learnt.contains_key(&fp) {
                    learnt.clear();
                }
                learnt.insert(fp, shared.clone());
            }
        }
    }

    /// The lines a peer gave that hold routing `fp`, if one did.
    pub(crate) fn routing_of(&self, fp: u64) -> Option<Arc<str>> {
        self.learnt_routings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fp)
            .cloned()
    }

    /// The line that tells a peer this member's stage, once there is one.
    pub(super) fn stage_line(&self) -> Option<Vec<u8>> {
        self.stage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|s| s.line().into_bytes())
    }

    pub(crate) fn figures(&self) -> &FleetFigures {
        &self.figures
    }

    /// The peers as configured (`--peer`), in order, but an entry that
    /// turned out to be this process.
    pub(crate) fn peer_names(&self) -> impl Iterator<Item = &str> {
        self.cfg
            .peers
            .iter()
            .zip(&self.links)
            .filter(|(_, l)| !l.myself.load(Ordering::Relaxed))
            .map(|((n, _), _)| n.as_str())
    }

    /// What each peer last said of its stage (`peer_names` order).
    pub(crate) fn heard(&self) -> Vec<Option<epoch::Stage>> {
        let heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        heard
            .iter()
            .zip(&self.links)
            .filter(|(_, l)| !l.myself.load(Ordering::Relaxed))
            .map(|(h, _)| *h)
            .collect()
    }

    /// How many of the configured peers are other processes.
    fn peers(&self) -> usize {
        self.links
            .iter()
            .filter(|l| !l.myself.load(Ordering::Relaxed))
            .count()
    }

    /// Whether this member and every peer heard from serve one routing,
    /// with no fleet reload under way.
    fn routes_alike(&self) -> bool {
        let Some(mine) = *self.stage.lock().unwrap_or_else(|p| p.into_inner()) else {
            return false;
        };
        let steady = |s: epoch::Stage| matches!(s, epoch::Stage::Steady { .. });
        steady(mine)
            && self
                .heard()
                .iter()
                .flatten()
                .all(|p| steady(*p) && p.serving() == mine.serving())
    }

    /// The peer listening on `listen` (process `instance`) said where it
    /// stands.
    pub(super) fn peer_said(
        &self,
        listen: std::net::SocketAddr,
        instance: &str,
        stage: epoch::Stage,
    ) {
        match self.link_of(listen, instance) {
            Some(i) => self.heard_from(i, stage),
            None => self.early(instance, |e| {
                e.stage = Some(stage);
                e.listen = Some(listen);
            }),
        }
    }

    /// Peer `i` said where it stands.
    pub(super) fn heard_from(&self, i: usize, stage: epoch::Stage) {
        self.figures.peers[i]
            .stage
            .store(stage.number(), Ordering::Relaxed);
        self.heard.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(stage);
    }

    /// A peer's hint: `server` missed `key` (None: every key); `held`: a
    /// write the peer gave up on may still reach it (`settle::Held`).
    fn learn(&self, server: &str, key: Option<&[u8]>, held: bool) {
        self.figures.hints_received.fetch_add(1, Ordering::Relaxed);
        let replica = self.servers_map().get(server).and_then(Weak::upgrade);
        match replica {
            Some(r) => {
                // Every key: the peer's list overflowed, or its reload
                // could not flush the server. Either way each member
                // flushes it, at once (`ha::upkeep`).
                if key.is_none() {
                    r.flush_owed.store(true, Ordering::Relaxed);
                }
                match key {
                    Some(k) if held => {
                        self.figures
                            .hints_held_received
                            .fetch_add(1, Ordering::Relaxed);
                        r.missed.learn_held(k);
                    }
                    _ => {
                        r.missed.learn(key, Source::Peer);
                    }
                }
            }
            None => {
                self.figures.hints_unknown.fetch_add(1, Ordering::Relaxed);
                // During a fleet reload a member names servers of a
                // routing another does not run yet (or any more): expected,
                // also for the few hints a reloading member sends before
                // its peers hear its new stage. A fleet configured unalike
                // sends them on and on.
                if self.routes_alike()
                    && self.unknown_while_alike.fetch_add(1, Ordering::Relaxed) + 1
                        == UNKNOWN_BEFORE_WARNING
                {
                    tracing::warn!(server, "a peer named a server this memrelay does not have: are the fleet's members configured alike?");
                }
            }
        }
    }

    /// Keeps a hint for this thread's next `flush_hints` (a worker's), or
    /// sends it to every peer reached and waits for their answers.
    fn hint(
        &self,
        me: &Arc<Fleet>,
        server: &str,
        key: Option<&[u8]>,
        share: Option<Share>,
        held: bool,
    ) {
        if self.links.is_empty() {
            // No peer to tell: the record is this process's alone.
            note_shares(share.as_slice(), false);
            return;
        }
        self.figures.hints_sent.fetch_add(1, Ordering::Relaxed);
        if held && key.is_some() {
            self.figures.hints_held_sent.fetch_add(1, Ordering::Relaxed);
        }
        let line = wire::hint(server, key, held);
        // A prober's or a resync's: no client reply waits for it.
        if let Err(share) = outbox::keep(me, &line, share) {
            self.send(&line, 1, share.as_slice());
        }
    }

    /// Sends `count` hints to every peer reached and waits for answers.
    /// Returns whether as many took them as `--peer-confirm` requires.
    /// Once one peer took them, their records are `shares`d: a crash of
    /// this process no longer takes them with it.
    fn send(&self, lines: &[u8], count: usize, shares: &[Share]) -> bool {
        let taken = link::send_to_all(self, lines, count);
        note_shares(shares, taken > 0);
        let enough = self.cfg.confirm.enough(taken, self.peers());
        if !enough {
            let n = self
                .figures
                .hints_unconfirmed
                .fetch_add(count as u64, Ordering::Relaxed);
            if n == 0 || n.is_power_of_two() {
                tracing::warn!(took = taken, peers = self.peers(), confirm = %self.cfg.confirm, "too few peers took a write's hints: such writes are answered SERVER_ERROR until enough are reached");
            }
        }
        if taken == 0 {
            let n = self
                .figures
                .hints_unacked
                .fetch_add(count as u64, Ordering::Relaxed);
            // Once per failure episode's start, not per key.
            if n == 0 || self.figures.peers_up() == 0 && n.is_power_of_two() {
                tracing::warn!(hints = count, "no peer took a hint: until one is reached, only this memrelay knows what the servers missed");
            }
        }
        enough
    }

    /// The hand-off gave the sockets to a new process: it takes the
    /// peers' connections from now on (the port is freed for it).
    pub(crate) fn hand_off(&self) {
        self.listening.store(false, Ordering::Release);
        listen::wake(&self.cfg.listen);
    }
}
